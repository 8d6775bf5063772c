"""The client's stream check must catch every way a stream can go wrong."""

from __future__ import annotations

import random

import pytest

from ftlab.client import LINE, StreamMismatch, StreamVerifier


def stream(first: int, lines: int) -> bytes:
    return b"".join(b"%011d\n" % n for n in range(first, first + lines))


def feed_in_random_chunks(data: bytes, seed: int = 1) -> StreamVerifier:
    rnd, v, i = random.Random(seed), StreamVerifier(), 0
    while i < len(data):
        n = rnd.randint(1, 40)
        v.feed(data[i : i + n])
        i += n
    return v


def test_a_correct_stream_in_any_chunking_passes():
    data = stream(0, 5000)
    for seed in range(5):
        assert feed_in_random_chunks(data, seed).offset == len(data)


@pytest.mark.parametrize(
    "damage", ["lose a line", "lose a byte", "duplicate a line", "swap two lines", "flip a byte"]
)
def test_damage_is_caught(damage):
    lines = [b"%011d\n" % n for n in range(3000)]
    data = b"".join(lines)
    at = 1234 * LINE
    if damage == "lose a line":
        data = data[:at] + data[at + LINE :]
    elif damage == "lose a byte":
        data = data[: at + 3] + data[at + 4 :]
    elif damage == "duplicate a line":
        data = data[:at] + lines[1234] + data[at:]
    elif damage == "swap two lines":
        data = data[:at] + lines[1235] + lines[1234] + data[at + 2 * LINE :]
    else:
        data = data[: at + 5] + b"X" + data[at + 6 :]
    with pytest.raises(StreamMismatch, match=r"stream byte 148\d\d:"):
        feed_in_random_chunks(data)
