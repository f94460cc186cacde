"""Serve the web page on 127.0.0.1, with an export folder beside it (standard library only).

    python3 clients/web/serve.py [EXPORT_DIR] [--port 8000]

then open the URL it prints. The page is clients/web/ at /web/, the Node runner's shared modules
at /node/, and EXPORT_DIR at /export/. Responses carry the cross-origin isolation headers
(COOP/COEP) that give onnxruntime-web its threads.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CLIENTS = Path(__file__).resolve().parent.parent
TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
}


class Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def __init__(self, *args, exports: dict[str, Path], **kwargs):
        self.exports = exports
        super().__init__(*args, directory=str(CLIENTS), **kwargs)

    def translate_path(self, path: str) -> str:
        """/export/NAME/FILE is FILE in the export folder NAME ("" for /export/FILE); else under clients/."""
        parts = unquote(urlsplit(path).path).split("/")
        if len(parts) > 2 and parts[1] == "export":
            for name, folder in self.exports.items():
                rest = parts[2:] if not name else parts[3:] if parts[2] == name else None
                if rest is not None and ".." not in rest:
                    return str(folder.joinpath(*rest))
            return str(CLIENTS / "missing")
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet: the page reports its own progress
        pass


def start(exports: dict[str, Path], port: int = 0) -> ThreadingHTTPServer:
    """Serve in a daemon thread on 127.0.0.1 (port 0: any free port); call .shutdown() to stop."""
    handler = functools.partial(
        Handler, exports={name: Path(path).resolve() for name, path in exports.items()}
    )
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", nargs="?", help="an export folder to serve at /export/")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.export_dir and not (Path(args.export_dir) / "gptneo_onnx.json").is_file():
        print(f"error: {args.export_dir} has no gptneo_onnx.json; pass an export folder", file=sys.stderr)
        return 2
    if not (CLIENTS / "web" / "node_modules" / "onnxruntime-web").is_dir():
        print("error: the page's packages are not installed: run `cd clients/web && npm ci`", file=sys.stderr)
        return 2
    try:
        server = start({"": Path(args.export_dir)} if args.export_dir else {}, args.port)
    except OSError as error:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {error.strerror}", file=sys.stderr)
        return 2
    query = "?export=/export/" if args.export_dir else ""
    print(f"serving http://127.0.0.1:{server.server_port}/web/{query} (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
