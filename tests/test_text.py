from safety_decoding.text import IncrementalDetokenizer, StopStringBuffer


def test_utf8_characters_never_split(tokenizer):
    text = "Hi 你好世界 🎉👍🏽 café"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some bytes were really held back


def test_stop_string_split_across_pushes_never_leaks():
    buf = StopStringBuffer(("###",))
    out = []
    for piece in ["Hello #", "#", "# tail"]:
        text, matched = buf.push(piece)
        out.append(text)
    assert "".join(out) == "Hello " and matched


def test_partial_stop_is_flushed_when_no_match():
    buf = StopStringBuffer(("STOP",))
    a, m1 = buf.push("go ST")
    b, m2 = buf.push("OP?")
    assert (a, m1) == ("go ", False)
    assert (b, m2) == ("", True)
    buf2 = StopStringBuffer(("STOP",))
    assert buf2.push("end ST") == ("end ", False)
    assert buf2.flush() == "ST"


def test_earliest_stop_wins():
    buf = StopStringBuffer(("b", "a"))
    assert buf.push("xxab") == ("xx", True)
