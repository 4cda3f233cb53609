"""Python modules generated from proto/snapkv/serving/v1/serving.proto (package snapkv.serving.v1).

Do not edit `serving_pb2.py`, `serving_pb2.pyi` or `serving_pb2_grpc.py` by hand: change the .proto file
and run `python proto/generate.py`. A test fails when these files differ from a fresh generation.
"""
