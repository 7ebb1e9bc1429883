"""A real S3 API on loopback for tests and benchmarks: moto's server in this process
(`ThreadedMotoServer`: the `moto_server` script forks a child that outlives a kill of its
parent), one bucket, and the AWS environment that points s3fs and boto3 at it, as a user's
`AWS_ENDPOINT_URL` would.

    with S3Server() as s3:
        s3.url("prefix")        # "s3://charbuild-test/prefix"
        s3.env                  # AWS_* variables, for child processes too
        s3.client               # boto3, to look at or damage what is stored
"""

from __future__ import annotations

import logging
import os
import uuid


def missing() -> str | None:
    """Why the S3 tests cannot run here (None when they can)."""
    for mod, pkg in (("moto.server", "moto[server]"), ("s3fs", "s3fs"), ("boto3", "boto3")):
        try:
            __import__(mod)
        except ImportError as exc:
            return f"{pkg} is not installed ({exc}); pip install -e '.[dev]'"
    return None


_SERVE = """
import logging, sys, time
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s:%d" % server.get_host_and_port(), flush=True)
sys.stdin.read()  # until the parent goes: it never outlives it
"""


class S3Server:
    """`own_process`: serve from a child process (a benchmark: the server's work then does
    not share this process's GIL with the client being measured)."""

    def __init__(self, bucket: str = "charbuild-test", own_process: bool = False):
        self.bucket = bucket
        self.own_process = own_process
        self.env: dict[str, str] = {}
        self._server = None
        self._proc = None
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> "S3Server":
        if self.own_process:
            import subprocess
            import sys

            self._proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True)
            host, port = self._proc.stdout.readline().strip().rsplit(":", 1)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in self.env.items():
            self._saved[k] = os.environ.get(k)
            os.environ[k] = v
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):  # a developer's own must not leak in
            self._saved[k] = os.environ.pop(k, None)
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="test", aws_secret_access_key="test")
        self.client.create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._server is not None:
            self._server.stop()
        if self._proc is not None:
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except Exception:
                self._proc.kill()
                self._proc.wait(10)

    def url(self, prefix: str | None = None) -> str:
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:8]}"

    def keys(self, prefix: str = "") -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)
