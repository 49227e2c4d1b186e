"""Calls Strata the way a grpc-core client does (grpcio with default channel options).

grpc-core sends the percent-encoded socket path as `:authority` on unix sockets, and enforces
its own default metadata limits on replies. Messages are encoded by hand, so that grpcio is
the only package needed. Prints one JSON object per call: the call, the status code name,
the message's length and its beginning.

Usage: grpc_core.py SOCKET
"""

import json
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    """A length-delimited field (bytes, string or message) or a varint field (int)."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def parse(buf):
    """The top-level fields of a message: number -> list of ints or bytes."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        fields.setdefault(num, []).append(value)
    return fields


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def mount_ext4_single_writer():
    # VolumeCapability { mount { fs_type: "ext4" }, access_mode { mode: SINGLE_NODE_WRITER } }
    return field(2, field(1, "ext4")) + field(3, field(1, 1))


def create_volume(name, size):
    return field(1, name) + field(2, field(1, size)) + field(3, mount_ext4_single_writer())


def main():
    channel = grpc.insecure_channel("unix:" + sys.argv[1])

    def call(method, request):
        stub = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            return "OK", "", stub(request, timeout=30)
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", None

    def report(name, method, request):
        code, message, reply = call(method, request)
        print(
            json.dumps(
                {"call": name, "code": code, "length": len(message), "message": message[:300]}
            ),
            flush=True,
        )
        return reply

    report("GetPluginInfo", "/csi.v1.Identity/GetPluginInfo", b"")
    report("Probe", "/csi.v1.Identity/Probe", b"")
    reply = report(
        "CreateVolume", "/csi.v1.Controller/CreateVolume", create_volume("py-vol", 16 << 20)
    )
    report(
        "ListVolumes with a 100 KiB token",
        "/csi.v1.Controller/ListVolumes",
        field(2, "x" * (100 * 1024)),
    )
    report(
        "CreateVolume with a 100 KiB name",
        "/csi.v1.Controller/CreateVolume",
        create_volume("n" * (100 * 1024), 16 << 20),
    )
    if reply is not None:
        volume = parse(parse(reply)[1][0])
        volume_id = volume[2][0]
        # A group snapshot of the volume, and its deletion with the group's snapshot ids.
        group_reply = report(
            "CreateVolumeGroupSnapshot",
            "/csi.v1.GroupController/CreateVolumeGroupSnapshot",
            field(1, "py-group") + field(2, volume_id),
        )
        if group_reply is not None:
            group = parse(parse(group_reply)[1][0])
            snapshot_ids = [parse(s)[2][0] for s in group.get(2, [])]
            request = field(1, group[1][0]) + b"".join(field(2, i) for i in snapshot_ids)
            report(
                "DeleteVolumeGroupSnapshot",
                "/csi.v1.GroupController/DeleteVolumeGroupSnapshot",
                request,
            )
        report("DeleteVolume", "/csi.v1.Controller/DeleteVolume", field(1, volume_id))
    channel.close()


if __name__ == "__main__":
    main()
