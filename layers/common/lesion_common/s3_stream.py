"""Write an S3 object as it is produced: parts of a multipart upload, so memory holds one part, not the object."""

from __future__ import annotations

import io
from types import TracebackType
from typing import Any, Final

PART_BYTES: Final = 8 * 1024 * 1024  # S3's minimum part is 5 MiB (the last part excepted)


class S3Writer:
    """``with S3Writer(s3, bucket, key) as out: out.write(text)``; an error inside the block aborts the upload.

    An object smaller than one part is written with one PutObject (no multipart upload is started).
    """

    def __init__(self, client: Any, bucket: str, key: str, part_bytes: int = PART_BYTES, **put_args: Any):
        self.client, self.bucket, self.key, self.part_bytes = client, bucket, key, part_bytes
        self.put_args = put_args
        self._buffer = io.BytesIO()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0

    def __enter__(self) -> S3Writer:
        return self

    def write(self, text: str | bytes) -> None:
        """Append to the object."""
        data = text.encode() if isinstance(text, str) else text
        self._buffer.write(data)
        self.bytes_written += len(data)
        if self._buffer.tell() >= self.part_bytes:
            self._flush_part()

    def _flush_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                                  **self.put_args)["UploadId"]
        number = len(self._parts) + 1
        answer = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                                         PartNumber=number, Body=self._buffer.getvalue())
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self._buffer = io.BytesIO()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is not None:
            if self._upload_id is not None:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            return
        if self._upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._buffer.getvalue(), **self.put_args)
            return
        if self._buffer.tell():
            self._flush_part()
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                                              MultipartUpload={"Parts": self._parts})
