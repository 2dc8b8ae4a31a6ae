"""A local folder or an ``s3://bucket/prefix/``, behind one small interface: batch scoring
reads its images and writes its results through it.

Every write is whole or absent: an S3 PUT, or a temporary file renamed into place
(:func:`recontrast_core.runtime.atomic_write`). Listings are lazy, one page at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from ..errors import UserError
from ..runtime import atomic_write, ensure_output_dir
from .storage import iter_s3_pages, parse_s3_uri, s3_client, s3_errors, with_retries


def is_s3(uri: Union[str, os.PathLike]) -> bool:
    return str(uri).startswith("s3://")


class LocalFolder:
    """A folder on this machine; names are ``/``-separated paths relative to it."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    def join(self, rel: str) -> str:
        return str(self.root / rel)

    def check_writable(self) -> None:
        ensure_output_dir(self.root)

    def pages(self, sub: str = "") -> Iterator[list[str]]:
        base = self.root / sub
        yield sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()) \
            if base.is_dir() else []

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> str:
        return str(atomic_write(self.root / rel, lambda p: p.write_bytes(data)))

    def write_file(self, rel: str, src: Path) -> str:
        return str(atomic_write(self.root / rel, lambda p: shutil.copyfile(src, p)))


class S3Prefix:
    """``s3://bucket/prefix/`` (credentials and endpoint: :func:`storage.s3_client`)."""

    def __init__(self, uri: str, client=None):
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.client = client or s3_client()

    def join(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{rel}"

    def check_writable(self) -> None:
        """The bucket exists and answers (a write is tried only by the first real output)."""
        from botocore.exceptions import ClientError

        with s3_errors(self.uri):
            try:
                with_retries(lambda: self.client.head_bucket(Bucket=self.bucket), f"head {self.uri}")
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket"):
                    raise UserError(f"{self.uri}: no such bucket ({self.bucket})") from None
                raise

    def pages(self, sub: str = "") -> Iterator[list[str]]:
        with s3_errors(self.join(sub)):
            for page in iter_s3_pages(self.client, self.bucket, self.prefix + sub):
                yield [o["Key"][len(self.prefix):] for o in page if not o["Key"].endswith("/")]

    def read_bytes(self, rel: str) -> bytes:
        with s3_errors(self.join(rel)):
            return with_retries(lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"].read(),
                                f"get {self.join(rel)}")

    def write_bytes(self, rel: str, data: bytes) -> str:
        with s3_errors(self.join(rel)):
            with_retries(lambda: self.client.put_object(Bucket=self.bucket, Key=self.prefix + rel, Body=data),
                         f"put {self.join(rel)}")
        return self.join(rel)

    def write_file(self, rel: str, src: Path) -> str:
        return self.write_bytes(rel, Path(src).read_bytes())


def open_location(uri: Union[str, os.PathLike], client=None) -> Union[LocalFolder, S3Prefix]:
    """``s3://bucket/prefix`` or a local folder; any other ``scheme://`` is a UserError."""
    text = str(uri)
    if is_s3(text):
        return S3Prefix(text, client)
    if "://" in text:
        raise UserError(f"{text}: unsupported location (a folder or s3://bucket/prefix/)")
    return LocalFolder(text)


def s3_object_exists(client, bucket: str, key: str) -> Optional[int]:
    """The size of ``s3://bucket/key`` when it is an object, else None."""
    from botocore.exceptions import ClientError

    try:
        return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
