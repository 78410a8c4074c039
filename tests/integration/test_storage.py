"""Both storage backends behind one interface: local folder and S3 (moto's server on 127.0.0.1)."""

import io

import pytest

from shared.storage import LocalStorage, ObjectNotFound, StorageError, storage_from_url


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return storage_from_url(f"s3://{bucket}/prefix", endpoint_url=endpoint)


def test_put_get_list_delete(storage, tmp_path):
    import hashlib

    data = b"x" * (3 * 1024 * 1024 + 7)
    size, sha = storage.put_stream("a/b/c.bin", io.BytesIO(data))
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert storage.exists("a/b/c.bin") and not storage.exists("a/b/missing")
    assert storage.get_bytes("a/b/c.bin") == data
    assert storage.download("a/b/c.bin", tmp_path / "copy.bin") == sha
    storage.put_bytes("a/d.txt", b"hi")
    assert storage.list_keys("a/") == ["a/b/c.bin", "a/d.txt"]
    storage.delete("a/d.txt")
    assert storage.list_keys("a") == ["a/b/c.bin"]
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("a/d.txt")
    storage.ping()


def test_local_keys_cannot_escape_root(tmp_path):
    with pytest.raises(StorageError):
        LocalStorage(tmp_path / "root").put_bytes("../outside", b"x")


def test_unknown_scheme():
    with pytest.raises(ValueError, match="file:// or s3://"):
        storage_from_url("ftp://x")
