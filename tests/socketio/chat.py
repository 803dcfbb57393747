"""A Socket.IO chat node and a Socket.IO client, for tests/socketio.rs.

    chat.py server NAME
        serve Socket.IO on 127.0.0.1, a free port; print "listening PORT"
    chat.py client URL TOKEN N [--token-in header|query] [--polling-only] [--wait SECONDS]
        connect (by default with the default transports: polling, then websocket; the token in
        an Authorization header), send N chat messages, print one JSON line of what happened

The node greets each connection with what it saw of the handshake (the identity the edge
injected, whether a token reached it) and answers each "chat" event with its text and the
node's name, as an acknowledgement.
"""

import argparse
import asyncio
import json
import sys

import socketio
from aiohttp import web


async def serve(name):
    # Pings every 2 s, answered within 3 s (Socket.IO's defaults: 25 s and 20 s): a polling
    # client's disconnect waits that long for its held request to end.
    sio = socketio.AsyncServer(async_mode="aiohttp", ping_interval=2, ping_timeout=3)
    app = web.Application()
    sio.attach(app)

    @sio.event
    async def connect(sid, environ, auth):
        query = environ.get("QUERY_STRING", "")
        await sio.emit(
            "welcome",
            {
                "node": name,
                "user": environ.get("HTTP_X_USER_ID"),
                "tenant": environ.get("HTTP_X_TENANT_ID"),
                "token_seen": "HTTP_AUTHORIZATION" in environ or "token=" in query,
            },
            to=sid,
        )

    @sio.on("chat")
    async def chat(sid, text):
        return {"node": name, "text": text}

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    # Until the test kills the process, or closes its stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def client(args):
    sio = socketio.AsyncClient(reconnection=False)
    welcome = asyncio.get_running_loop().create_future()

    @sio.on("welcome")
    async def on_welcome(data):
        if not welcome.done():
            welcome.set_result(data)

    url, headers = args.url, {}
    if args.token_in == "query":
        # python-engineio sends custom headers with its first request only; a token that must
        # reach every long-poll goes in the URL (or a cookie).
        url += f"?token={args.token}"
    else:
        headers["Authorization"] = f"Bearer {args.token}"
    transports = ["polling"] if args.polling_only else None
    result = {}
    try:
        await sio.connect(
            url, headers=headers, transports=transports, wait_timeout=args.wait
        )
        result["welcome"] = await asyncio.wait_for(welcome, args.wait)
        if not args.polling_only:
            # The upgrade to a WebSocket runs in the background after the polling handshake,
            # and the client has no event for it.
            for _ in range(200):
                if sio.transport() == "websocket":
                    break
                await asyncio.sleep(0.05)
        result["transport"] = sio.transport()
        result["replies"] = [
            await sio.call("chat", f"message {i}", timeout=args.wait)
            for i in range(args.messages)
        ]
        await sio.disconnect()
    except Exception as error:  # reported to the test, which decides
        result["error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server")
    server.add_argument("name")
    client_args = modes.add_parser("client")
    client_args.add_argument("url")
    client_args.add_argument("token")
    client_args.add_argument("messages", type=int)
    client_args.add_argument("--token-in", choices=["header", "query"], default="header")
    client_args.add_argument("--polling-only", action="store_true")
    client_args.add_argument("--wait", type=float, default=10)
    args = parser.parse_args()
    if args.mode == "server":
        asyncio.run(serve(args.name))
    else:
        asyncio.run(client(args))


if __name__ == "__main__":
    main()
