#!/usr/bin/env python3
"""Reference for the ingest benchmark: python-hl7's asyncio MLLP server answering every message
with an ACK (message.create_ack()). It parses and acknowledges, nothing more: no storage, no fsync,
no duplicates window. Run with the test venv's python (scripts/test-deps.sh creates it):

    target/test-venv/bin/python scripts/python-ack-server.py --port 2576
"""
import argparse
import asyncio

import hl7
import hl7.mllp


async def serve_connection(reader, writer):
    try:
        while not writer.is_closing():
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        if not writer.is_closing():
            writer.close()


async def main(host, port):
    server = await hl7.mllp.start_hl7_server(
        serve_connection, host=host, port=port, limit=1 << 24, encoding="utf-8"
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2576)
    args = ap.parse_args()
    asyncio.run(main(args.host, args.port))
