"""``piopiy-voice api``: serve the API (uvicorn), or manage API keys.

    piopiy-voice api [--host H] [--port P]            serve (PV_API_HOST / PV_API_PORT)
    piopiy-voice api keys create --scopes read,listen [--name N]   prints the key once
    piopiy-voice api keys list
    piopiy-voice api keys revoke KEY_ID
"""

from __future__ import annotations

import argparse
import logging
import sys

from piopiy_voice.errors import PiopiyConfigError


def _keys_main(argv: list[str]) -> int:
    from piopiy_voice.redisconn import connect, resolve_redis_url  # noqa: PLC0415
    from piopiy_voice.settings import Settings  # noqa: PLC0415

    from . import auth  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="piopiy-voice api keys", description="Manage API keys.")
    ap.add_argument("--redis-url", help="Redis URL (REDIS_URL)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("create", help="create a key; it is printed once")
    p.add_argument("--scopes", required=True, help=f"comma-separated: {','.join(auth.SCOPES)}")
    p.add_argument("--name", default="", help="who or what the key is for")
    sub.add_parser("list", help="key ids, names and scopes (never the keys)")
    p = sub.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("key_id")
    args = ap.parse_args(argv)
    try:
        r = connect(resolve_redis_url(args.redis_url or Settings.from_env().redis_url))
    except PiopiyConfigError as exc:
        print(f"piopiy-voice api keys: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "create":
        try:
            key_id, key = auth.create_key(r, args.scopes, args.name)
        except ValueError as exc:
            print(f"piopiy-voice api keys: {exc}", file=sys.stderr)
            return 2
        print(key)
        print(f"key id {key_id}, scopes {args.scopes}: store it now, it cannot be shown again",
              file=sys.stderr)
        return 0
    if args.cmd == "list":
        for k in auth.list_keys(r):
            print(f"{k['id']}  {','.join(k['scopes']):<26} {k.get('name', '')}")
        return 0
    if auth.revoke_key(r, args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"piopiy-voice api keys: no key with id {args.key_id!r}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keys"]:
        return _keys_main(argv[1:])
    from piopiy_voice.settings import Settings  # noqa: PLC0415

    from .config import ApiSettings  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="piopiy-voice api",
                                 description="HTTP API: list, listen to and steer calls; answer "
                                             "inbound calls; the supervisor console. "
                                             "'piopiy-voice api keys --help' manages API keys.")
    ap.add_argument("--host", default=None, help="bind address (default: PV_API_HOST)")
    ap.add_argument("--port", type=int, default=None, help="port (default: PV_API_PORT)")
    ap.add_argument("--redis-url", default=None, help="Redis URL (default: REDIS_URL; required)")
    args = ap.parse_args(argv)
    from piopiy_voice.observability import setup_logging  # noqa: PLC0415
    from piopiy_voice.redisconn import redact_url, resolve_redis_url  # noqa: PLC0415

    try:
        settings = Settings.from_env()
        api = ApiSettings.from_env()
        api = api.replace(host=args.host or api.host, port=api.port if args.port is None else args.port)
        url = resolve_redis_url(args.redis_url or settings.redis_url)
    except PiopiyConfigError as exc:
        print(f"piopiy-voice api: {exc}", file=sys.stderr)
        return 2
    setup_logging("api", level=settings.log_level, fmt=settings.log_format)
    log = logging.getLogger(__name__)
    import uvicorn  # noqa: PLC0415

    from .app import create_app  # noqa: PLC0415

    if settings.using_dev_secret:
        log.warning("PV_SIGNING_SECRET is the insecure dev value: signed listen/control URLs are forgeable")
    log.info("api: redis %s", redact_url(url))
    app = create_app(settings, api, url)
    config = uvicorn.Config(app, host=api.host, port=api.port, log_level="warning",
                            ws_max_size=64 * 1024, ws_ping_interval=20, ws_ping_timeout=20,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    print(f"api listening on http://{api.host}:{api.port} (console at /console)", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
