#!/usr/bin/env python3
"""Records what real gRPC clients send, as seeds for the fuzz targets.

Listens on PROXY_SOCKET, relays every connection to a running strata's SERVER_SOCKET, and
when a connection ends writes what the client sent into
  OUTDIR/frame_rewriter/<client>-<n>   the whole client-to-server byte stream
  OUTDIR/hpack_decoder/<client>-<n>    its header blocks, each behind a 2-byte length
Point clients at PROXY_SOCKET; stop with Ctrl-C. See fuzz/README.md.

Usage: capture.py SERVER_SOCKET PROXY_SOCKET OUTDIR CLIENT_NAME
"""
import asyncio
import os
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def header_blocks(stream):
    """The header blocks of an HTTP/2 client stream, CONTINUATIONs joined."""
    if not stream.startswith(PREFACE):
        return []
    data, blocks, current = stream[len(PREFACE):], [], b""
    while len(data) >= 9:
        length = int.from_bytes(data[0:3], "big")
        kind, flags = data[3], data[4]
        payload = data[9:9 + length]
        if kind == 0x1:
            if flags & 0x8:  # padded
                payload = payload[1:len(payload) - payload[0]]
            if flags & 0x20:  # priority
                payload = payload[5:]
        if kind in (0x1, 0x9):
            current += payload
            if flags & 0x4:
                blocks.append(current)
                current = b""
        data = data[9 + length:]
    return blocks


async def main(server, proxy, outdir, client):
    for sub in ("frame_rewriter", "hpack_decoder"):
        os.makedirs(os.path.join(outdir, sub), exist_ok=True)
    count = 0

    async def handle(reader, writer):
        nonlocal count
        count += 1
        n = count
        up_reader, up_writer = await asyncio.open_unix_connection(server)
        sent = bytearray()

        async def pump(src, dst, record):
            try:
                while chunk := await src.read(65536):
                    if record is not None:
                        record.extend(chunk)
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, sent), pump(up_reader, writer, None))
        name = f"{client}-{n}"
        with open(os.path.join(outdir, "frame_rewriter", name), "wb") as f:
            f.write(sent)
        with open(os.path.join(outdir, "hpack_decoder", name), "wb") as f:
            for block in header_blocks(bytes(sent)):
                f.write(len(block).to_bytes(2, "big") + block)
        print(f"captured {name}: {len(sent)} bytes", file=sys.stderr)

    srv = await asyncio.start_unix_server(handle, path=proxy)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    try:
        asyncio.run(main(*sys.argv[1:]))
    except KeyboardInterrupt:
        pass
