"""The manifest: validation, atomic writes, paths that stay inside the bundle."""

import json
import os

import pytest

from edgepeft.bundle import Bundle, check_adapter_name, new_manifest
from edgepeft.errors import BundleError
from edgepeft.files import TMP_PREFIX, atomic_path, sha256_file, write_bytes_atomic


DIMS = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "vocab_size": 16}


def make_bundle(root):
    root.mkdir()
    (root / "tokenizer.json").write_text("{}")
    b = Bundle(root, new_manifest(base={"fingerprint": "sha256:00", "dims": DIMS}, tokenizer={}))
    b.record_file("tokenizer.json")
    b.save()
    return root


def test_saved_manifest_reopens_with_hashes_and_sizes(tmp_path):
    b = Bundle.open(make_bundle(tmp_path / "b"))
    assert b.manifest["files"]["tokenizer.json"]["size"] == 2
    b.verify_hashes()


def test_a_replaced_file_is_detected(tmp_path):
    root = make_bundle(tmp_path / "b")
    (root / "tokenizer.json").write_text("{ }")
    with pytest.raises(BundleError, match="size differs"):
        Bundle.open(root)
    (root / "tokenizer.json").write_text("[]")  # same size, other bytes
    with pytest.raises(BundleError, match="sha256 differs"):
        Bundle.open(root).verify_hashes()


@pytest.mark.parametrize("content, message", [
    ("{", "corrupt manifest"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "other"}', "not an edgepeft manifest"),
    ('{"format": "edgepeft-bundle", "format_version": 99}', "format version 99"),
])
def test_bad_manifests_are_refused(tmp_path, content, message):
    root = make_bundle(tmp_path / "b")
    (root / "edgepeft.json").write_text(content)
    with pytest.raises(BundleError, match=message):
        Bundle.open(root)


def test_paths_escaping_the_bundle_are_refused(tmp_path):
    root = make_bundle(tmp_path / "b")
    m = json.loads((root / "edgepeft.json").read_text())
    m["files"]["../outside"] = {"sha256": "0", "size": 0}
    (root / "edgepeft.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="escapes the bundle"):
        Bundle.open(root)


def test_missing_directory_and_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="edgepeft.json is missing"):
        Bundle.open(tmp_path / "empty")


def test_atomic_write_leaves_old_content_and_no_temp_file_on_failure(tmp_path):
    dest = tmp_path / "f.txt"
    write_bytes_atomic(dest, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert dest.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("name", ["../x", "a/b", "", "-lead", "x" * 65])
def test_adapter_names_that_could_escape_or_confuse_are_refused(name):
    with pytest.raises(BundleError, match="invalid"):
        check_adapter_name(name)


def cacheable_tokenizer(root, monkeypatch):
    """Age the bundle's tokenizer.json past the racy window, so that its hash is cached; return
    it, its mtime and the list of files the sha256 check reads from now on."""
    from edgepeft import hash_cache

    tok = root / "tokenizer.json"
    old = tok.stat().st_mtime_ns - 10**10
    os.utime(tok, ns=(old, old))
    reads = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda p: reads.append(p) or real(p))
    return tok, old, reads


def test_hashes_are_checked_at_open_and_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    root = make_bundle(tmp_path / "b")
    tok, old, reads = cacheable_tokenizer(root, monkeypatch)
    Bundle.open(root)
    assert reads == [tok]
    Bundle.open(root)  # unchanged since: answered from the cache
    assert reads == [tok]
    tok.write_text("[]")  # same size, new content, new mtime: re-read at open
    with pytest.raises(BundleError, match="sha256 differs"):
        Bundle.open(root)
    # A tamperer who restores the mtime defeats the fast path (see docs/security.md), never the full check.
    tok.write_text("{}")
    os.utime(tok, ns=(old, old))
    Bundle.open(root)
    tok.write_text("[]")
    os.utime(tok, ns=(old, old))
    Bundle.open(root)  # fast path trusts (device, inode, size, mtime)
    with pytest.raises(BundleError, match="sha256 differs"):
        Bundle.open(root, verify_hashes=True)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_damaged_hash_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cache = tmp_path / "cache" / "file-hashes.json"
    cache.write_text('{"1:2": [1, "x"], "3:4": 5')
    root = make_bundle(tmp_path / "b")
    tok, old, reads = cacheable_tokenizer(root, monkeypatch)
    assert Bundle.open(root).manifest["files"]["tokenizer.json"]["size"] == 2  # opens, no error
    assert reads == [tok]  # hashed by reading it: nothing in the damaged cache was trusted
    st = tok.stat()
    assert json.loads(cache.read_text()) == {f"{st.st_dev}:{st.st_ino}": [2, old, sha256_file(tok)]}  # rewritten


def test_symlinks_leading_out_of_the_bundle_are_refused(tmp_path):
    root = make_bundle(tmp_path / "b")
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink that leads outside"):
        Bundle.open(root)


def test_recover_removes_orphan_adapter_files_and_temporary_files(tmp_path):
    from edgepeft.recovery import recover

    root = make_bundle(tmp_path / "b")
    (root / "adapters").mkdir()
    (root / "adapters" / "ghost.gguf").write_bytes(b"GGUF")  # add-adapter killed before its manifest
    (root / f"{TMP_PREFIX}edgepeft.json.abc").write_text("{")
    (tmp_path / f"{TMP_PREFIX}b.xyz").mkdir()  # an export's staging directory
    (tmp_path / "unrelated.txt").write_text("keep")
    message = recover(root)
    assert "removed 3 leftover files" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "unrelated.txt"]
    assert list((root / "adapters").iterdir()) == []
    assert recover(root) is None
    Bundle.open(root)
