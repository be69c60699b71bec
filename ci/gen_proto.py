"""Regenerate the protobuf modules from the .proto sources (needs grpcio-tools).

    pip install grpcio-tools && python ci/gen_proto.py

The generated ``*_pb2.py`` files are committed so that building and installing
octoproxy never needs ``protoc``.
"""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "src" / "octoproxy" / "protocol" / "proto"

for proto in sorted(PROTO_DIR.glob("*.proto")):
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={PROTO_DIR}", f"--pyi_out={PROTO_DIR}", str(proto)])
    if rc:
        sys.exit(f"protoc failed on {proto.name}")
    print("generated", proto.with_suffix("").name + "_pb2.py")
