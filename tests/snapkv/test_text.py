"""Incremental detokenisation and stop strings, on the byte-level test tokenizer where every UTF-8
byte is its own token, so multi-byte characters always arrive split."""

import pytest

from snapkv.text import TextStream, prompt_ids, stop_token_ids
from snapkv.tiny_models import byte_tokenizer

TOKENIZER = byte_tokenizer()


def stream_text(text, stop=(), context=""):
    stream = TextStream(TOKENIZER, stop, TOKENIZER(context).input_ids if context else ())
    deltas = [stream.push(token) for token in TOKENIZER(text).input_ids]
    deltas.append(stream.finish())
    return deltas, stream


def test_multibyte_characters_arrive_whole():
    text = "héllo wörld ☃ 𝄞"
    deltas, _ = stream_text(text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    # The snowman is three bytes: nothing is emitted until its last byte arrives.
    snowman_bytes = len("☃".encode())
    start = len("héllo wörld ".encode())
    assert deltas[start : start + snowman_bytes] == ["", "", "☃"]


def test_leading_space_of_first_token_survives():
    deltas, _ = stream_text(" answer", context="Question?")
    assert deltas[0] == " "
    assert "".join(deltas) == " answer"


def test_stop_string_cuts_output():
    deltas, stream = stream_text("Hello END world", stop=("END",))
    assert "".join(deltas) == "Hello "
    assert stream.stopped


def test_partial_stop_string_is_held_then_released():
    stream = TextStream(TOKENIZER, ("END",))
    assert [stream.push(t) for t in TOKENIZER("aEN").input_ids] == ["a", "", ""]
    assert stream.push(TOKENIZER("x").input_ids[0]) == "ENx"
    assert stream.finish() == ""


def test_earliest_of_several_stop_strings_wins():
    deltas, _ = stream_text("one two three", stop=("three", "two"))
    assert "".join(deltas) == "one "


def test_text_after_stop_is_dropped():
    stream = TextStream(TOKENIZER, ("!",))
    output = "".join(stream.push(t) for t in TOKENIZER("hi! more").input_ids)
    assert output == "hi"
    assert stream.push(TOKENIZER("z").input_ids[0]) == ""


def test_stop_ids_include_end_of_turn_markers():
    assert stop_token_ids(TOKENIZER, [None]) == {256, 257}


def test_plain_prompt_without_chat_template():
    assert prompt_ids(TOKENIZER, "hi") == TOKENIZER("hi").input_ids
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(TOKENIZER, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="exactly one"):
        prompt_ids(TOKENIZER)
