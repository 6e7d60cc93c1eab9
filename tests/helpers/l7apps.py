"""A WebSocket and a gRPC server and client (Debian's python3-websockets and
python3-grpcio), for the transparency tests on ports declared HTTP. Clients
print what they observed as JSON.

  l7apps.py ws-serve PORT | ws-client URL | grpc-serve PORT | grpc-client HOST:PORT
"""
from __future__ import annotations

import asyncio
import json
import sys

SERVICE = "meshd.Test"


def ws_serve(port: int) -> None:
    import websockets

    async def echo(ws, *_):
        async for msg in ws:
            await ws.send(msg)

    async def main():
        # host None: every address of both families (asyncio makes "::" IPv6-only)
        async with websockets.serve(echo, None, port, max_size=None, ping_interval=None):
            print("ready", flush=True)
            await asyncio.Future()
    asyncio.run(main())


def ws_client(url: str) -> dict:
    import websockets

    async def main():
        big = bytes(range(256)) * 4096   # 1 MiB
        async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
            await ws.send("hello")
            text = await ws.recv()
            await ws.send(big)
            echoed = await ws.recv()
            await asyncio.sleep(2)   # idle, no pings
            await ws.send("still there")
            late = await ws.recv()
            await ws.close()
            return {"text": text, "binary_ok": echoed == big, "late": late,
                    "close_code": ws.close_code}
    return asyncio.run(main())


def grpc_serve(port: int) -> None:
    from concurrent import futures

    import grpc

    def fail(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1]),
        "Stream": grpc.unary_stream_rpc_method_handler(
            lambda req, ctx: (req + bytes([48 + i]) for i in range(3))),
        "Bidi": grpc.stream_stream_rpc_method_handler(lambda it, ctx: (r.upper() for r in it)),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def grpc_client(target: str) -> dict:
    import grpc

    with grpc.insecure_channel(target) as ch:
        m = lambda kind, name: getattr(ch, kind)(f"/{SERVICE}/{name}")
        out = {"unary": m("unary_unary", "Unary")(b"abc", timeout=10).decode(),
               "stream": [r.decode() for r in m("unary_stream", "Stream")(b"x", timeout=10)],
               "bidi": [r.decode() for r in m("stream_stream", "Bidi")(iter([b"a", b"b"]),
                                                                       timeout=10)]}
        try:
            m("unary_unary", "Fail")(b"", timeout=10)
        except grpc.RpcError as e:
            out["error"] = [e.code().name, e.details()]
    return out


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "ws-serve":
        ws_serve(int(arg))
    elif cmd == "grpc-serve":
        grpc_serve(int(arg))
    else:
        print(json.dumps((ws_client if cmd == "ws-client" else grpc_client)(arg)))
