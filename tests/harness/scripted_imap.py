"""A small IMAP server on 127.0.0.1 that answers sanely, except for one reply it is told to spoil.

For the fuzz suite (tests/integration/test_fuzz_imap_replies.py): the product's real IMAP
adapters talk to it over a real socket, and one chosen reply (the n-th answer to one command,
counted over every session of the server) is replaced by a `Mutation` of it: cut short, garbage,
a literal announcing the wrong size, untagged noise, another UID's answer, a refusal, a BYE, a
wrong tag, the connection closed or gone silent. Every other reply is plain RFC 3501 (IMAP4rev1)
with LITERAL+ (RFC 7888) and UIDPLUS (RFC 4315), over a mailbox of folders held in memory.

    server = ScriptedImapServer({"INBOX": [body, ...]}, fault=Fault("UID FETCH", 0, Cut(40, "close")))
    server.port, server.folders["Work"].messages, server.appends_stored, server.close()

No TLS: the product logs in over plain text only on a loopback host without STARTTLS, as here.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import threading
from dataclasses import dataclass, field

from imapclient.datetime_util import datetime_to_INTERNALDATE, parse_to_datetime

from tests.harness.imap_wire import CRLF, ImapSyntaxError, Tok, parse_tokens

CAPABILITIES = b"IMAP4rev1 LITERAL+ UIDPLUS"
# A command line (without literals) is never longer than this from the product; more is garbage.
MAX_COMMAND_LINE = 64 * 1024
# A literal from the product (an APPEND) in these tests is never larger than this.
MAX_LITERAL = 1024 * 1024
GO_ON, CLOSE, SILENT = "go on", "close", "silent"


@dataclass
class Message:
    uid: int
    body: bytes
    flags: tuple[bytes, ...]
    internaldate: dt.datetime  # timezone-aware


@dataclass
class Folder:
    uidvalidity: int
    messages: list[Message] = field(default_factory=list)  # in UID order
    uidnext: int = 1

    def add(self, body: bytes, flags: tuple[bytes, ...], internaldate: dt.datetime) -> Message:
        message = Message(self.uidnext, body, flags, internaldate)
        self.messages.append(message)
        self.uidnext += 1
        return message


# ---- the mutations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spoiled:
    """What the server does instead of the sane reply: send `data`, then go on, close or go silent
    (hold the connection open and answer nothing more, until the client gives up)."""

    data: bytes
    then: str = GO_ON


class Mutation:
    # Whether the server carries out the command it spoils the answer of (an APPEND stores the
    # message): not when the answer says it was refused, so that what it says stays true.
    carried_out = True

    def spoil(self, reply: bytes, tag: bytes) -> Spoiled:
        raise NotImplementedError


@dataclass(frozen=True)
class Cut(Mutation):
    """The reply cut after `at` bytes (of however many it has), then the connection closed or silent."""

    at: int
    then: str

    def spoil(self, reply, tag):
        return Spoiled(reply[: self.at % max(len(reply), 1)], self.then)


@dataclass(frozen=True)
class Garbage(Mutation):
    """Bytes instead of the reply, then closed or silent (nothing else could end the command)."""

    data: bytes
    then: str

    def spoil(self, reply, tag):
        return Spoiled(self.data, self.then)


@dataclass(frozen=True)
class GarbageFirst(Mutation):
    """A line of garbage, then the sane reply."""

    data: bytes

    def spoil(self, reply, tag):
        return Spoiled(self.data.replace(b"\r", b"").replace(b"\n", b"") + CRLF + reply)


@dataclass(frozen=True)
class Noise(Mutation):
    """Untagged responses a server may send at any time (RFC 3501 7: EXISTS, RECENT, EXPUNGE,
    a FETCH of flags, OK [ALERT], CAPABILITY) inserted before line `at` of the reply."""

    lines: tuple[bytes, ...]
    at: int

    def spoil(self, reply, tag):
        lines = reply.split(CRLF)[:-1]
        # Only between responses: a line that follows a literal continues its response.
        starts = [i for i, line in enumerate(lines) if line.startswith((b"* ", tag + b" ", b"+ "))] or [0]
        where = starts[self.at % len(starts)]
        noise = list(self.lines)
        return Spoiled(CRLF.join(lines[:where] + noise + lines[where:]) + CRLF)


@dataclass(frozen=True)
class LiteralSize(Mutation):
    """The first literal announces `size` bytes instead of its own; then closed or silent (a
    wrong size leaves the rest of the stream misread: nothing sane can follow)."""

    size: int
    then: str

    def spoil(self, reply, tag):
        spoiled = re.sub(rb"\{\d+\}\r\n", b"{%d}\r\n" % self.size, reply, count=1)
        return Spoiled(spoiled, self.then)


@dataclass(frozen=True)
class OtherUid(Mutation):
    """Answers for UIDs not asked for: every UID in FETCH responses, and every number a SEARCH
    answers, moved by `by` (never 0)."""

    by: int

    def spoil(self, reply, tag):
        def moved(match: re.Match) -> bytes:
            return b"%s%d" % (match.group(1), max(1, int(match.group(2)) + self.by))

        reply = re.sub(rb"(FETCH \(UID )(\d+)", moved, reply)
        return Spoiled(re.sub(rb"^(\* SEARCH(?: \d+)*? )(\d+)", moved, reply, flags=re.MULTILINE))


@dataclass(frozen=True)
class Refused(Mutation):
    """The tagged line says NO or BAD (with `text`) instead of OK; the command is not carried out."""

    status: bytes
    text: bytes
    carried_out = False

    def spoil(self, reply, tag):
        text = self.text.replace(b"\r", b"").replace(b"\n", b"")
        return Spoiled(b"%s %s %s\r\n" % (tag, self.status, text))


@dataclass(frozen=True)
class Bye(Mutation):
    """`* BYE` instead of the reply, and the connection closed (RFC 3501 7.1.5)."""

    carried_out = False

    def spoil(self, reply, tag):
        return Spoiled(b"* BYE server shutting down\r\n", CLOSE)


@dataclass(frozen=True)
class WrongTag(Mutation):
    """The tagged line carries a tag the client never sent."""

    def spoil(self, reply, tag):
        return Spoiled(re.sub(rb"^%s " % re.escape(tag), b"Z999 ", reply, flags=re.MULTILINE))


@dataclass(frozen=True)
class Dropped(Mutation):
    """No reply: the connection closed at once."""

    carried_out = False

    def spoil(self, reply, tag):
        return Spoiled(b"", CLOSE)


@dataclass
class Fault:
    """Spoil the `occurrence`-th (from 0) reply to `command` ("GREETING", "CAPABILITY", "LOGIN",
    "EXAMINE", "SELECT", "LIST", "CREATE", "UID SEARCH", "UID FETCH", "APPEND", ...)."""

    command: str
    occurrence: int
    mutation: Mutation
    applied: bool = False


# ---- the server ------------------------------------------------------------------------------------
class ScriptedImapServer:
    host = "127.0.0.1"
    user = "fuzz"
    password = "fuzz-password"

    def __init__(self, folders: dict[str, list[tuple[bytes, tuple[bytes, ...], dt.datetime]]], fault: Fault | None = None):
        self.folders: dict[str, Folder] = {}
        for index, (name, messages) in enumerate(folders.items()):
            folder = self.folders[name] = Folder(uidvalidity=1000 + index)
            for body, flags, internaldate in messages:
                folder.add(body, flags, internaldate)
        self.fault = fault
        self.commands: list[bytes] = []  # each command line, without its literal
        self.appends_stored = 0
        self._answered: dict[str, int] = {}  # command -> replies so far
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._start(self._accept)

    def close(self) -> None:
        """Stop: every connection shut (a thread waiting on a silent one wakes), every thread joined."""
        self._closed = True
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=10)
            assert not thread.is_alive(), "the scripted IMAP server did not stop"

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name="scripted-imap", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._connections.append(connection)
            self._start(self._serve, connection)

    # ---- one session -------------------------------------------------------------------------------
    def _serve(self, connection: socket.socket) -> None:
        selected: list[Folder | None] = [None]
        _ack_at_once(connection)
        with connection, connection.makefile("rb") as rfile:
            if not self._send(connection, rfile, "GREETING", b"", b"* OK scripted IMAP ready\r\n"):
                return
            while not self._closed:
                _ack_at_once(connection)
                try:
                    line = rfile.readline(MAX_COMMAND_LINE)
                except OSError:
                    return
                if not line.endswith(CRLF):
                    return  # closed, or not a command line
                tag, _, command = line[:-2].partition(b" ")
                literal = None
                announced = re.search(rb"(~?)\{(\d+)(\+?)\}$", command)
                if announced:
                    size = int(announced.group(2))
                    if size > MAX_LITERAL:
                        return
                    if not announced.group(3):
                        connection.sendall(b"+ go ahead\r\n")  # a synchronising literal (RFC 3501 7.5)
                    literal = rfile.read(size)
                    rfile.readline()  # the CRLF that ends the command
                    command = command[: announced.start()]
                with self._lock:
                    self.commands.append(line[:-2])
                name = _command_name(command)
                try:
                    reply, carry_out = self._answer(tag, name, command, literal, selected)
                except (ImapSyntaxError, ValueError, IndexError) as bad:
                    reply, carry_out = b"%s BAD %s\r\n" % (tag, str(bad).encode("ascii", "replace")), None
                if not self._send(connection, rfile, name, tag, reply, carry_out):
                    return
                if name == "LOGOUT":
                    return

    def _send(self, connection, rfile, name: str, tag: bytes, reply: bytes, carry_out=None) -> bool:
        """Send the reply, or its spoiled form if it is the fault's; False when the session ends."""
        spoiled = Spoiled(reply)
        mutation = None
        with self._lock:
            count = self._answered.get(name, 0)
            self._answered[name] = count + 1
            fault = self.fault
            if fault is not None and not fault.applied and fault.command == name and fault.occurrence == count:
                fault.applied = True
                mutation = fault.mutation
        if mutation is not None:
            spoiled = mutation.spoil(reply, tag)
        if carry_out is not None and (mutation is None or mutation.carried_out):
            carry_out()
        try:
            connection.sendall(spoiled.data)
            if spoiled.then == SILENT:
                while rfile.read1(65536):  # whatever comes is not answered, until the client closes
                    pass
        except OSError:
            return False
        return spoiled.then == GO_ON

    def _answer(self, tag: bytes, name: str, command: bytes, literal: bytes | None, selected: list):
        """The sane reply to one command, and what carrying it out changes (None: nothing)."""
        args = parse_tokens([command], [literal] if literal is not None else [])[1:]
        ok = b"%s OK %s completed\r\n" % (tag, name.encode())
        if name == "CAPABILITY":
            return b"* CAPABILITY %s\r\n" % CAPABILITIES + ok, None
        if name == "LOGIN":
            if (args[0].text, args[1].text) != (self.user.encode(), self.password.encode()):
                return b"%s NO [AUTHENTICATIONFAILED] invalid credentials\r\n" % tag, None
            return ok, None
        if name in ("NOOP", "CHECK"):
            return ok, None
        if name == "LOGOUT":
            return b"* BYE logging out\r\n" + ok, None
        if name in ("SELECT", "EXAMINE"):
            folder = self.folders.get(_mailbox(args[0]))
            if folder is None:
                selected[0] = None
                return b"%s NO [NONEXISTENT] no such mailbox\r\n" % tag, None
            selected[0] = folder
            # RFC 3501 6.3.1: FLAGS, EXISTS, RECENT, UIDVALIDITY, UIDNEXT and PERMANENTFLAGS.
            access = b"READ-WRITE" if name == "SELECT" else b"READ-ONLY"
            return (
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
                b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags\r\n"
                b"* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY %d] uids\r\n* OK [UIDNEXT %d] next\r\n"
                b"%s OK [%s] %s completed\r\n"
            ) % (len(folder.messages), folder.uidvalidity, folder.uidnext, tag, access, name.encode()), None
        if name == "LIST":
            # RFC 3501 6.3.8; the product's names have no wildcards, so a name matches itself.
            wanted = _mailbox(args[0]) + _mailbox(args[1])
            found = b"".join(b'* LIST () "/" "%s"\r\n' % n.encode() for n in self.folders if n == wanted)
            return found + ok, None
        if name == "CREATE":
            folder_name = _mailbox(args[0])
            if folder_name in self.folders:
                return b"%s NO [ALREADYEXISTS] mailbox exists\r\n" % tag, None  # RFC 5530
            return ok, lambda: self.folders.setdefault(folder_name, Folder(uidvalidity=2000 + len(self.folders)))
        if name == "APPEND":
            folder = self.folders.get(_mailbox(args[0]))
            if folder is None:
                return b"%s NO [TRYCREATE] no such mailbox\r\n" % tag, None  # RFC 3501 6.3.11
            flags = tuple(tok.value for tok in args[1].value) if len(args) > 3 else ()
            internaldate = parse_to_datetime(args[-2].text, normalise=False) if len(args) > 2 else _now()
            uid = folder.uidnext

            def store() -> None:
                with self._lock:
                    folder.add(args[-1].value, flags, internaldate)
                    self.appends_stored += 1

            # RFC 4315 3: APPENDUID <uidvalidity> <uid> in the tagged OK.
            return b"%s OK [APPENDUID %d %d] APPEND completed\r\n" % (tag, folder.uidvalidity, uid), store
        if name in ("UID SEARCH", "UID FETCH"):
            folder = selected[0]
            if folder is None:
                return b"%s BAD no mailbox selected\r\n" % tag, None
            if name == "UID SEARCH":
                found = _search(folder, args[1:])
                return b"* SEARCH" + b"".join(b" %d" % uid for uid in found) + CRLF + ok, None
            return _fetch(folder, args[1], args[2]) + ok, None
        return b"%s BAD unknown command\r\n" % tag, None


def _ack_at_once(connection: socket.socket) -> None:
    """Acknowledge what comes at once (Linux's TCP_QUICKACK, which lapses, so set before each
    read): imapclient writes some commands in two pieces, and Nagle's algorithm holds the second
    until the first is acknowledged, which a delayed ACK puts off by 40 ms a command."""
    if hasattr(socket, "TCP_QUICKACK"):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _command_name(command: bytes) -> str:
    words = command.split(b" ", 2)
    name = words[0].upper().decode("ascii", "replace")
    if name == "UID" and len(words) > 1:
        name = f"UID {words[1].upper().decode('ascii', 'replace')}"
    return name


def _mailbox(tok: Tok) -> str:
    name = tok.text.decode("ascii")  # modified UTF-7 (RFC 3501 5.1.3); ours are ASCII
    return "INBOX" if name.upper() == "INBOX" else name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _uid_set(text: bytes, folder: Folder) -> set[int]:
    """A UID set (RFC 3501 9, sequence-set); "*" is the highest UID, and "n:*" always takes it in
    even when n is above it (RFC 3501 6.4.8)."""
    highest = folder.messages[-1].uid if folder.messages else 0
    uids: set[int] = set()
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        low_uid = highest if low == b"*" else int(low)
        high_uid = low_uid if not high else highest if high == b"*" else int(high)
        low_uid, high_uid = sorted((low_uid, high_uid))
        uids.update(message.uid for message in folder.messages if low_uid <= message.uid <= high_uid)
    return uids


def _search(folder: Folder, criteria: list[Tok]) -> list[int]:
    """UID SEARCH with the keys the product sends: UID <set>, SINCE <date>, BEFORE <date>, ALL
    (RFC 3501 6.4.4: keys are ANDed; dates compare the INTERNALDATE's date)."""
    found = {message.uid for message in folder.messages}
    keys = iter(criteria)
    for key in keys:
        word = key.upper()
        if word == b"ALL":
            continue
        value = next(keys)
        if word == b"UID":
            found &= _uid_set(value.text, folder)
        elif word in (b"SINCE", b"BEFORE"):
            day = dt.datetime.strptime(value.text.decode("ascii"), "%d-%b-%Y").date()
            keep = (lambda d: d >= day) if word == b"SINCE" else (lambda d: d < day)
            found &= {message.uid for message in folder.messages if keep(message.internaldate.date())}
        else:
            raise ValueError(f"search key {word!r} not supported")
    return sorted(found)


def _fetch(folder: Folder, uid_set: Tok, items: Tok) -> bytes:
    """UID FETCH responses, each with its UID (RFC 3501 6.4.8), items in the order asked."""
    wanted = items.value if items.kind == "list" else [items]
    out = b""
    for seq, message in enumerate(folder.messages, start=1):
        if message.uid not in _uid_set(uid_set.text, folder):
            continue
        parts = [b"UID %d" % message.uid]
        for item in wanted:
            word = item.upper()
            if word == b"UID":
                continue
            if word == b"FLAGS":
                parts.append(b"FLAGS (%s)" % b" ".join(message.flags))
            elif word == b"INTERNALDATE":
                parts.append(b'INTERNALDATE "%s"' % datetime_to_INTERNALDATE(message.internaldate).encode("ascii"))
            elif word == b"RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d" % len(message.body))
            elif word.startswith(b"BODY.PEEK[") or word.startswith(b"BODY["):
                section = item.value[item.value.index(b"[") :]
                data = _section(message.body, section)
                parts.append(b"BODY%s {%d}\r\n%s" % (section, len(data), data))
            else:
                raise ValueError(f"fetch item {word!r} not supported")
        out += b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))
    return out


def _section(body: bytes, section: bytes) -> bytes:
    """BODY[], BODY[HEADER] and BODY[HEADER.FIELDS (...)] (RFC 3501 6.4.5: the header with its
    blank line; the fields named, in the message's order, and the blank line)."""
    header_end = body.find(b"\r\n\r\n")
    header = body if header_end < 0 else body[: header_end + 2]
    if section == b"[]":
        return body
    if section.upper() == b"[HEADER]":
        return header + b"\r\n"
    names = re.search(rb"\((.*)\)", section).group(1).upper().split()
    fields, keep = [], False
    for line in header.split(b"\r\n")[:-1]:
        if not line[:1].isspace():
            keep = line.split(b":", 1)[0].strip().upper() in names
        if keep:
            fields.append(line + b"\r\n")
    return b"".join(fields) + b"\r\n"
