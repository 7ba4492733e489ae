"""IMAP on the wire, just enough for the fronts in this folder (``outlook_front``, ``gmail_front``):
a command's or response's tokens once its literals are taken out, and back; one server response
with its literals.

Moved here from ``outlook_front`` so the Gmail front shares it, with the session's wire
(``WireSession``) both fronts had a copy of.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass

CRLF = b"\r\n"
# A literal announced at the end of a line: ``{n}``, ``{n+}`` or a literal8 ``~{n}`` (RFC 3516).
LITERAL_AT_END = re.compile(rb"(~?)\{(\d+)(\+?)\}\r\n$")


class ImapSyntaxError(ValueError):
    pass


@dataclass
class Tok:
    kind: str  # "atom", "quoted", "literal", "list"
    value: object  # bytes (atom: raw; quoted: raw with quotes; literal: data) or list[Tok]

    @property
    def text(self) -> bytes:
        """The string an atom, quoted string or literal stands for."""
        if self.kind == "quoted":
            return re.sub(rb"\\(.)", rb"\1", self.value[1:-1])
        if self.kind == "list":
            raise ImapSyntaxError("a list where a string was expected")
        return self.value

    def upper(self) -> bytes:
        return self.text.upper() if self.kind != "list" else b""


def parse_tokens(texts: list[bytes], literals: list[bytes]) -> list[Tok]:
    """Tokens of an IMAP line whose literals were taken out: ``texts[i]`` is followed by
    ``literals[i]``. Atoms keep ``[...]`` sections (with their blanks and parentheses) and
    ``<...>`` partials whole."""
    stack: list[list[Tok]] = [[]]
    for index, text in enumerate(texts):
        pos = 0
        while pos < len(text):
            char = text[pos : pos + 1]
            if char in (b" ", b"\r", b"\n"):
                pos += 1
            elif char == b"(":
                inner: list[Tok] = []
                stack[-1].append(Tok("list", inner))
                stack.append(inner)
                pos += 1
            elif char == b")":
                if len(stack) == 1:
                    raise ImapSyntaxError("unbalanced )")
                stack.pop()
                pos += 1
            elif char == b'"':
                end = pos + 1
                while end < len(text) and text[end : end + 1] != b'"':
                    end += 2 if text[end : end + 1] == b"\\" else 1
                if end >= len(text):
                    raise ImapSyntaxError("unterminated quoted string")
                stack[-1].append(Tok("quoted", text[pos : end + 1]))
                pos = end + 1
            else:
                end, depth = pos, 0
                while end < len(text):
                    c = text[end : end + 1]
                    if c == b"[":
                        depth += 1
                    elif c == b"]":
                        depth -= 1
                    elif depth == 0 and c in (b" ", b"(", b")"):
                        break
                    end += 1
                stack[-1].append(Tok("atom", text[pos:end]))
                pos = end
        if index < len(literals):
            stack[-1].append(Tok("literal", literals[index]))
    if len(stack) != 1:
        raise ImapSyntaxError("unbalanced (")
    return stack[0]


def dump(tokens: list[Tok], *, plus: bool) -> bytes:
    """Tokens back to the wire; literals as ``{n+}`` (to Dovecot) or ``{n}`` (to the client)."""
    out = []
    for tok in tokens:
        if tok.kind == "list":
            out.append(b"(" + dump(tok.value, plus=plus) + b")")
        elif tok.kind == "literal":
            out.append(b"{%d%s}\r\n" % (len(tok.value), b"+" if plus else b"") + tok.value)
        else:
            out.append(tok.value)
    return b" ".join(out)


def astring(value: bytes) -> Tok:
    if value and re.fullmatch(rb"[\x20-\x7e]*", value):
        return Tok("quoted", b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
    return Tok("literal", value)


@dataclass
class Response:
    """One server response: its lines with the literal markers taken out, and the literals."""

    texts: list[bytes]
    literals: list[bytes]

    @property
    def first(self) -> bytes:
        return self.texts[0]

    def wire(self) -> bytes:
        out = []
        for index, text in enumerate(self.texts):
            out.append(text)
            if index < len(self.literals):
                out.append(b"{%d}\r\n" % len(self.literals[index]) + self.literals[index])
        return b"".join(out) + CRLF


class SessionClosed(Exception):
    pass


class WireSession:
    """The wire of one client's session through a front: bytes to the client, a literal from it,
    one whole response (with its literals) from Dovecot. The front's session sets `_client` (the
    client's socket), `_from_client` and `_from_server` (buffered readers) and `_write_lock`."""

    def _to_client(self, data: bytes) -> None:
        with self._write_lock:
            self._client.sendall(data)

    def _read_exactly(self, size: int) -> bytes:
        data = self._from_client.read(size)
        if len(data) != size:
            raise SessionClosed("the client closed the connection inside a literal")
        return data

    def _read_response(self) -> Response:
        line = self._from_server.readline()
        if not line:
            raise SessionClosed("Dovecot closed the connection")
        texts, literals = [], []
        while True:
            literal = LITERAL_AT_END.search(line)
            if not literal:
                texts.append(line[:-2] if line.endswith(CRLF) else line.rstrip(b"\n"))
                return Response(texts, literals)
            texts.append(line[: literal.start()])
            size = int(literal.group(2))
            data = self._from_server.read(size)
            if len(data) != size:
                raise SessionClosed("Dovecot closed the connection inside a literal")
            literals.append(data)
            line = self._from_server.readline()


class Listening:
    """The listening side shared by the proxy and the fronts: an accept loop that hands each
    connection to `_serve` on a thread of its own, and a close that stops it. The class sets
    `_listener`, `_acceptor`, `_closed` and `_lock`, and names its threads with `_thread_name`."""

    _thread_name = "imap-session"

    def _accept(self) -> None:
        while not self._closed:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(raw,), name=self._thread_name, daemon=True).start()

    def _stop_listening(self, sessions: list) -> None:
        """Stop accepting, close `sessions` (taken under the lock), wait for the accept loop."""
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            open_ = list(sessions)
        for session in open_:
            session.close()
        self._acceptor.join(timeout=10)
