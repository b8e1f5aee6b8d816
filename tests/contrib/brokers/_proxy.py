"""A TCP proxy on 127.0.0.1 in front of a real server, to make the network between fail."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards connections on ``port`` to a server on 127.0.0.1:*target*.

    :meth:`down` closes every connection and stops listening (connecting is
    refused) until :meth:`up`; :meth:`blackhole` drops everything the server
    sends (the client's requests still reach it); :meth:`cut` closes every
    connection and forwards normally again, so the client reconnects through
    it. The server behind it is real; only the network between is made to fail.
    """

    def __init__(self, target: int) -> None:
        self._target = target
        self._dropping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._serve(self._listener)

    def up(self) -> None:
        """Listen again on the same port (after :meth:`down`)."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._serve(self._listener)

    def down(self) -> None:
        """Close every connection and stop listening: connecting is refused until :meth:`up`."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the accept() blocked on it; close() alone would
            # not, and the port would go on accepting.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.cut()

    def blackhole(self) -> None:
        self._dropping.set()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._dropping.clear()

    def close(self) -> None:
        self.down()

    def _serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            server = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._sockets += [client, server]
            for src, dst, from_server in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(src, dst, from_server), daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (from_server and self._dropping.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
