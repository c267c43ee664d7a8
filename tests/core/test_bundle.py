"""The manifest: validation, atomic writes, paths that stay inside the bundle."""

import json

import pytest

from edgepeft.bundle import Bundle, check_adapter_name, new_manifest
from edgepeft.errors import BundleError
from edgepeft.files import TMP_PREFIX, atomic_path, write_bytes_atomic


def make_bundle(root):
    root.mkdir()
    (root / "tokenizer.json").write_text("{}")
    b = Bundle(root, new_manifest(base={"fingerprint": "sha256:00"}, tokenizer={}))
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
