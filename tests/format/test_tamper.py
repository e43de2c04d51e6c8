"""Bad input: every tampered, truncated, appended or spliced file fails with a typed error,
and nothing partially decrypted is ever returned."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sealedtorch
from sealedtorch.errors import FormatError, IntegrityError, KeyUnavailable
from sealedtorch.format.spec import FIXED_SIZE, TAG_SIZE
from sealedtorch.keys import ModelKey

IDENT = 12  # magic, version, cipher, flags: mutations here are FormatError by design
CHUNK = 4096


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> tuple[Path, ModelKey, dict[str, torch.Tensor]]:
    d = tmp_path_factory.mktemp("sealed")
    key = ModelKey.generate("victim")
    torch.manual_seed(1)
    sd = {"a": torch.randn(3000), "b": torch.randint(0, 9, (777,)), "c": torch.tensor(1.0),
          "d": torch.randn(40, 40).half()}
    sealedtorch.seal(sd, d / "m.sealed", key=key, chunk_size=CHUNK, metadata={"arch": "x"})
    return d / "m.sealed", key, sd


def _expected_error(offset: int) -> type[Exception]:
    return FormatError if offset < IDENT else IntegrityError


def _load(path: Path, key: ModelKey) -> dict[str, torch.Tensor]:
    return sealedtorch.load_state_dict(path, key=key)




@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipping_any_bit_anywhere_is_detected(sealed, tmp_path_factory, data):
    path, key, _ = sealed
    raw = bytearray(path.read_bytes())
    offset = data.draw(st.integers(0, len(raw) - 1), label="offset")
    bit = data.draw(st.integers(0, 7), label="bit")
    raw[offset] ^= 1 << bit
    target = tmp_path_factory.mktemp("flip") / "m.sealed"
    target.write_bytes(raw)
    with pytest.raises(_expected_error(offset)):
        _load(target, key)


def test_flipping_each_byte_of_preamble_and_header_is_detected(sealed, tmp_path):
    """Exhaustive over the small, dense region that random offsets rarely hit."""
    path, key, _ = sealed
    original = path.read_bytes()
    end = sealedtorch.read_preamble(path).data_offset
    target = tmp_path / "m.sealed"
    for offset in range(end):
        raw = bytearray(original)
        raw[offset] ^= 0x01
        target.write_bytes(raw)
        with pytest.raises(_expected_error(offset)):
            _load(target, key)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncating_at_any_length_is_detected(sealed, tmp_path_factory, data):
    path, key, _ = sealed
    raw = path.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1), label="length")
    target = tmp_path_factory.mktemp("cut") / "m.sealed"
    target.write_bytes(raw[:cut])
    with pytest.raises(FormatError if cut < IDENT else IntegrityError):
        _load(target, key)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.binary(min_size=1, max_size=CHUNK + TAG_SIZE + 10))
def test_appending_any_bytes_is_detected(sealed, tmp_path_factory, extra):
    path, key, _ = sealed
    target = tmp_path_factory.mktemp("app") / "m.sealed"
    target.write_bytes(path.read_bytes() + extra)
    with pytest.raises(IntegrityError, match="trailing bytes"):
        _load(target, key)


def _chunks(path: Path) -> tuple[bytes, list[bytes]]:
    pre = sealedtorch.read_preamble(path)
    raw = path.read_bytes()
    head, data = raw[:pre.data_offset], raw[pre.data_offset:]
    step = pre.chunk_size + TAG_SIZE
    return head, [data[i:i + step] for i in range(0, len(data), step)]


def test_swapping_two_chunks_is_detected(sealed, tmp_path):
    path, key, _ = sealed
    head, chunks = _chunks(path)
    chunks[0], chunks[1] = chunks[1], chunks[0]
    (tmp_path / "m.sealed").write_bytes(head + b"".join(chunks))
    with pytest.raises(IntegrityError, match="chunk 0"):
        _load(tmp_path / "m.sealed", key)


def test_dropping_the_last_chunk_and_fixing_sizes_is_still_detected(sealed, tmp_path):
    """Even a consistent-looking shorter file fails: the header binds data_length."""
    path, key, _sd = sealed
    head, chunks = _chunks(path)
    (tmp_path / "m.sealed").write_bytes(head + b"".join(chunks[:-1]))
    with pytest.raises(IntegrityError):
        _load(tmp_path / "m.sealed", key)


def test_chunk_spliced_from_another_file_under_the_same_key_is_detected(sealed, tmp_path):
    path, key, sd = sealed
    other = tmp_path / "other.sealed"
    sealedtorch.seal(sd, other, key=key, chunk_size=CHUNK)
    head, chunks = _chunks(path)
    _, other_chunks = _chunks(other)
    chunks[2] = other_chunks[2]
    (tmp_path / "m.sealed").write_bytes(head + b"".join(chunks))
    with pytest.raises(IntegrityError, match="chunk 2"):
        _load(tmp_path / "m.sealed", key)


def test_header_swapped_between_files_is_detected(sealed, tmp_path):
    path, key, sd = sealed
    other = tmp_path / "other.sealed"
    sealedtorch.seal(sd, other, key=key, chunk_size=CHUNK)
    _a_head, a_chunks = _chunks(path)
    b_head, _ = _chunks(other)
    (tmp_path / "m.sealed").write_bytes(b_head + b"".join(a_chunks))
    with pytest.raises(IntegrityError):
        _load(tmp_path / "m.sealed", key)


def test_wrong_key_says_the_key_does_not_match(sealed):
    path, _, _ = sealed
    with pytest.raises(IntegrityError, match="key does not match this file"):
        _load(path, ModelKey.generate("victim"))


def test_key_for_another_model_says_which_model_it_is_for(sealed):
    path, _, _ = sealed
    with pytest.raises(IntegrityError, match=r"'other' version 1.*'victim' version 1"):
        _load(path, ModelKey.generate("other"))


def test_key_source_without_that_model_raises_key_unavailable(sealed):
    path, _, _ = sealed
    from sealedtorch.keys import StaticKeys

    with pytest.raises(KeyUnavailable):
        sealedtorch.load_state_dict(path, key=StaticKeys(ModelKey.generate("x")))


def test_bad_magic_is_a_format_error(tmp_path):
    (tmp_path / "m.sealed").write_bytes(b"PK\x03\x04 this is a zip file" + bytes(200))
    with pytest.raises(FormatError, match="bad magic"):
        sealedtorch.read_preamble(tmp_path / "m.sealed")


def test_unknown_format_version_is_a_format_error(sealed, tmp_path):
    path, key, _ = sealed
    raw = bytearray(path.read_bytes())
    raw[8] = 9
    (tmp_path / "m.sealed").write_bytes(raw)
    with pytest.raises(FormatError, match="unsupported format version 9"):
        _load(tmp_path / "m.sealed", key)


def test_empty_file_is_a_format_error(tmp_path):
    (tmp_path / "m.sealed").write_bytes(b"")
    with pytest.raises(FormatError):
        sealedtorch.read_preamble(tmp_path / "m.sealed")


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        sealedtorch.read_preamble(tmp_path / "nope.sealed")


def test_failed_load_zeroes_the_decrypted_buffer(sealed, tmp_path, monkeypatch):
    """Chunks decrypted before the bad one must not survive in memory."""
    path, key, _ = sealed
    head, chunks = _chunks(path)
    last = bytearray(chunks[-1])
    last[0] ^= 1
    chunks[-1] = bytes(last)
    (tmp_path / "m.sealed").write_bytes(head + b"".join(chunks))
    from sealedtorch.format import reader

    captured: list[dict[str, torch.Tensor]] = []
    real = reader._allocate

    def spy(entries, *, pin: bool) -> dict[str, torch.Tensor]:
        captured.append(real(entries, pin=pin))
        return captured[-1]

    monkeypatch.setattr(reader, "_allocate", spy)
    with pytest.raises(IntegrityError):
        sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key, workers=1)
    assert captured and all(int(t.count_nonzero()) == 0 for t in captured[0].values())


def test_preamble_region_mutation_without_key_is_reported_on_load(sealed, tmp_path):
    path, key, _ = sealed
    raw = bytearray(path.read_bytes())
    raw[FIXED_SIZE - 3] ^= 0xFF  # inside data_length
    (tmp_path / "m.sealed").write_bytes(raw)
    with pytest.raises(IntegrityError):
        _load(tmp_path / "m.sealed", key)


def test_original_file_is_untouched_by_failed_loads(sealed, tmp_path):
    path, key, sd = sealed
    copy = tmp_path / "copy.sealed"
    shutil.copy(path, copy)
    with pytest.raises(IntegrityError):
        _load(copy, ModelKey.generate("victim"))
    out = _load(copy, key)
    assert torch.equal(out["a"], sd["a"])
