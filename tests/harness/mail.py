"""Two real Dovecot IMAP servers on loopback (a "gmail" and an "outlook"), and helpers.

Each server is its own ``dovecot -F -c CONF`` process group with its own folder (on
/dev/shm when there is one): config, base_dir, state_dir, log, mail. It listens on
127.0.0.1 with IMAPS and a plain port offering STARTTLS, both with the test certificate.
Any user name exists (static userdb, allow_all_users): tests isolate themselves with
``new_user()``. LOGIN/PLAIN take ``password`` for every user; XOAUTH2/OAUTHBEARER go to
the oauth2 passdb, which asks ``oauth_server``'s introspection endpoint: a token logs in
only as the user it was issued for. Dovecot's auth penalty and failure delay are off.

Helpers: ``connect``/``tls_client`` (verified TLS), ``append`` (exact bytes: imapclient's
own ``append`` rewrites line endings), ``seed``, ``read_folder``, ``corpus``, ``corpus_seed``,
``assert_copied_exactly``, ``uidnext``.
"""

from __future__ import annotations

import csv
import grp
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl as ssl_module
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Union

import pytest
from imapclient import IMAPClient
from imapclient.imapclient import datetime_to_INTERNALDATE, seq_to_parenstr

from tests.harness.tls import LocalCA

CORPUS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
_BARRIER = "logins-barrier"  # user names logins() makes for itself, never counted

_CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
{ssl_dh}
auth_mechanisms = plain login xoauth2 oauthbearer
auth_verbose = yes
# A failed login does not slow the next one from 127.0.0.1 (the anvil penalty: auth
# cannot reach a mode-0 socket once it is not root). 2.3.19 still answers each failure
# on its next 500 ms tick, auth_failure_delay = 0 or not.
auth_failure_delay = 0
{unprivileged}
service auth {{
  user = $default_internal_user
}}
service anvil {{
  # No chroot: a server not started as root cannot chroot, and these are throwaway servers.
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = static
  args = password={password}
  mechanisms = plain login
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={root}/mail/%u allow_all_users=yes
}}
mail_location = maildir:~/Maildir:LAYOUT=fs
mail_fsync = never
namespace inbox {{
  inbox = yes
  separator = /
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {plain_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
"""

_OAUTH2_CONFIG = """\
introspection_mode = post
introspection_url = {url}
force_introspection = yes
active_attribute = active
active_value = true
username_attribute = username
"""


class DovecotServer:
    host = "127.0.0.1"

    def __init__(self, name: str, domain: str, ca: LocalCA, introspection_url: str, password: str = "test-password"):
        self.name, self.domain, self.password = name, domain, password
        self.ca_bundle_path = ca.ca_bundle_path
        self._ca, self._introspection_url = ca, introspection_url
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = Path(tempfile.mkdtemp(prefix=f"dovecot-{name}-", dir=shm))
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.imaps_port = self.plain_port = 0
        self._proc: subprocess.Popen | None = None

    # ---- life ------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The master process's pid, which is also its process group's; None when stopped."""
        return None if self._proc is None else self._proc.pid

    def start(self, attempts: int = 5) -> None:
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self.root.chmod(0o755)  # the imap processes run as nobody
            shutil.chown(self.root / "mail", "nobody", "nogroup")
            mail_user, mail_group, unprivileged = "nobody", "nogroup", ""
        else:
            # Started by a user (`make demo` on a laptop): every process runs as that user
            # (Dovecot's "running without root": its own login and internal users, no chroot).
            mail_user, mail_group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
            unprivileged = (
                f"default_login_user = {mail_user}\ndefault_internal_user = {mail_user}\n"
                f"default_internal_group = {mail_group}"
            )
        (self.root / "oauth2.conf").write_text(_OAUTH2_CONFIG.format(url=self._introspection_url))
        dh = "/usr/share/dovecot/dh.pem"
        for _ in range(attempts):  # free ports are picked, then bound by Dovecot: may race
            self.plain_port, self.imaps_port = _free_port(), _free_port()
            self.config_path.write_text(
                _CONFIG.format(
                    root=self.root,
                    cert=self._ca.cert_path,
                    key=self._ca.key_path,
                    ssl_dh=f"ssl_dh = <{dh}" if os.path.exists(dh) else "",
                    password=self.password,
                    plain_port=self.plain_port,
                    imaps_port=self.imaps_port,
                    mail_user=mail_user,
                    mail_group=mail_group,
                    unprivileged=unprivileged,
                )
            )
            self._launch()
            if self._wait_ready(deadline=time.monotonic() + 15):
                return
            self.stop()
        raise RuntimeError(f"dovecot {self.name} did not start:\n{self._diagnostics()}")

    def _launch(self) -> None:
        with open(self.root / "stderr", "ab") as err:
            self._proc = subprocess.Popen(
                [shutil.which("dovecot", path=_SBIN) or "dovecot", "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the whole server, master and session processes, as a crash would: nothing is
        flushed or said to the clients; their next read or write fails."""
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        """Start again after kill() or stop(), on the same ports with the same mail, so clients
        configured for it reconnect as to a server that came back."""
        assert self._proc is None, "restart() follows kill() or stop()"
        self._launch()
        if not self._wait_ready(deadline=time.monotonic() + 15):
            raise RuntimeError(f"dovecot {self.name} did not restart:\n{self._diagnostics()}")

    def _wait_ready(self, deadline: float) -> bool:
        """Ready when the plain port greets and the IMAPS port accepts; False if Dovecot exited."""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.plain_port), timeout=2) as s:
                    greeted = s.recv(100).startswith(b"* OK")
                if greeted:
                    socket.create_connection((self.host, self.imaps_port), timeout=2).close()
                    return True
            except OSError:
                pass
            time.sleep(0.01)  # not listening yet: poll again, bounded by the deadline
        raise RuntimeError(f"dovecot {self.name} not ready in time:\n{self._diagnostics()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _diagnostics(self) -> str:
        parts = [p.read_text(errors="replace")[-4000:] for p in (self.root / "stderr", self.log_path) if p.exists()]
        return "\n".join(parts)

    # ---- what tests use --------------------------------------------------------------
    def new_user(self, prefix: str = "user") -> str:
        """A fresh address on this server, e.g. ``alice-1a2b3c@gmail.test``."""
        return f"{prefix}-{secrets.token_hex(3)}@{self.domain}"

    def ssl_context(self) -> ssl_module.SSLContext:
        return ssl_module.create_default_context(cafile=self.ca_bundle_path)

    def doveadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``doveadm -c CONF ARGS...`` e.g. ``doveadm("mailbox", "update", "-u", u, "--uid-validity", "7", "INBOX")``."""
        done = subprocess.run(
            [shutil.which("doveadm", path=_SBIN) or "doveadm", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logins(self, user: str | None = None) -> int:
        """Successful IMAP logins (any mechanism) in the log so far, for ``user`` or for all.

        Dovecot writes the "Login:" line from another process, so the line of a login
        that just completed may not be in the file yet. This first logs in a marker user
        and waits (bounded) for its line: every earlier login's line is written by then.
        """
        marker = self.new_user(_BARRIER)
        connect(self, marker).logout()
        wait_for(lambda: marker in self._logged_in(), timeout=10, what=f"login of {marker} in {self.log_path}")
        users = [u for u in self._logged_in() if not u.startswith(_BARRIER)]
        return len(users) if user is None else users.count(user)

    def _logged_in(self) -> list[str]:
        return re.findall(r"imap-login: Info: Login: user=<([^>]*)>", self.log_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="session")
def dovecot_pair(test_ca, oauth_server):
    """``.gmail`` (users ``...@gmail.test``) and ``.outlook`` (``...@outlook.test``): DovecotServer."""
    servers = {
        "gmail": DovecotServer("gmail", "gmail.test", test_ca, oauth_server.introspection_url),
        "outlook": DovecotServer("outlook", "outlook.test", test_ca, oauth_server.introspection_url),
    }
    try:
        for server in servers.values():
            server.start()
        yield SimpleNamespace(**servers)
    finally:
        for server in servers.values():
            server.close()


# ---- IMAP helpers ------------------------------------------------------------------------
def tls_client(server: DovecotServer, *, ssl: bool = True, timeout: float = 30) -> IMAPClient:
    """Not yet logged in; TLS verified against the test CA: IMAPS, or STARTTLS on the plain port."""
    if ssl:
        return IMAPClient(server.host, port=server.imaps_port, ssl=True, ssl_context=server.ssl_context(), timeout=timeout)
    client = IMAPClient(server.host, port=server.plain_port, ssl=False, timeout=timeout)
    client.starttls(server.ssl_context())
    return client


def connect(server: DovecotServer, user: str, *, ssl: bool = True) -> IMAPClient:
    """Logged in as ``user`` with LOGIN and the server's password."""
    client = tls_client(server, ssl=ssl)
    client.login(user, server.password)
    return client


class AppendRefused(Exception):
    pass


def append(
    client: IMAPClient,
    folder: str,
    message: bytes,
    flags: Iterable[str | bytes] = (),
    internaldate: datetime | None = None,
    *,
    binary: bool = False,
) -> int:
    """APPEND ``message`` byte for byte; returns its UID (APPENDUID).

    imapclient's ``append`` goes through imaplib, which turns every CR, LF and CRLF
    into CRLF before sending; ``multiappend`` sends exact bytes but ignores NO. This
    sends a LITERAL+ literal (``{n+}``), or with ``binary=True`` a BINARY literal8
    (``~{n+}``, RFC 3516) that may carry NUL bytes.
    """
    imap = client._imap
    parts = [b"APPEND", client._normalise_folder(folder), seq_to_parenstr(list(flags)).encode()]
    if internaldate is not None:
        parts.append(b'"%s"' % datetime_to_INTERNALDATE(internaldate).encode())
    tag = imap._new_tag()
    literal = b"%s{%d+}" % (b"~" if binary else b"", len(message))
    imap.send(b"%s %s %s\r\n%s\r\n" % (tag, b" ".join(parts), literal, message))
    typ, data = imap._command_complete("APPEND", tag)
    text = b" ".join(d for d in data if isinstance(d, bytes))
    found = re.search(rb"\[APPENDUID \d+ (\d+)\]", text)
    if typ != "OK" or not found:
        raise AppendRefused(f"APPEND to {folder!r} answered {typ} {text!r}")
    return int(found.group(1))


Message = Union[bytes, tuple[bytes, Iterable[str | bytes], Union[datetime, None]]]


def seed(server: DovecotServer, user: str, folder: str, messages: Iterable[Message], *, binary: bool = False) -> list[int]:
    """APPEND messages (bytes, or (bytes, flags, internaldate)) to ``folder``, creating it
    (and its parents; "/" separates) if missing. Returns the UIDs in order."""
    client = connect(server, user)
    try:
        if not client.folder_exists(folder):
            client.create_folder(folder)
        uids = []
        for m in messages:
            body, flags, when = (m, (), None) if isinstance(m, bytes) else m
            uids.append(append(client, folder, body, flags, when, binary=binary))
        return uids
    finally:
        client.logout()


@dataclass(frozen=True)
class Stored:
    uid: int
    body: bytes  # BODY[]
    flags: frozenset[bytes]  # without \Recent, which belongs to a session, not the message
    internaldate: datetime  # timezone-aware, in the zone the server answered with


def expunge(server: DovecotServer, user: str, uid: int, folder: str = "INBOX") -> None:
    """The user deletes a message (the test's own session; the syncer never changes the source)."""
    client = connect(server, user)
    try:
        client.select_folder(folder)
        client.delete_messages([uid])
        client.expunge()
    finally:
        client.logout()


def read_folder(server: DovecotServer, user: str, folder: str) -> list[Stored]:
    """Every message of ``folder`` by UID (FETCH BODY.PEEK[], FLAGS, INTERNALDATE).

    Not BINARY[]: it decodes the top part's Content-Transfer-Encoding, and imapclient
    misreads the literal8 (``~{n}``) it comes in."""
    client = connect(server, user)
    client.normalise_times = False
    try:
        client.select_folder(folder, readonly=True)
        uids = client.search("ALL")
        if not uids:
            return []
        found = client.fetch(uids, [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"])
        return [
            Stored(uid, found[uid][b"BODY[]"], frozenset(found[uid][b"FLAGS"]) - {b"\\Recent"}, found[uid][b"INTERNALDATE"])
            for uid in sorted(found)
        ]
    finally:
        client.logout()


# ---- the shared corpus -------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusMessage:
    name: str
    bytes: bytes
    traits: frozenset[str]


def corpus() -> list[CorpusMessage]:
    """The real-world messages of ``../shared/corpus`` (beside the repo), checked against
    MANIFEST.tsv's sizes and sha256, in manifest order."""
    messages = []
    with open(CORPUS_DIR / "MANIFEST.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            data = (CORPUS_DIR / row["file"]).read_bytes()
            if len(data) != int(row["bytes"]) or hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise AssertionError(f"corpus file {row['file']} does not match MANIFEST.tsv")
            traits = frozenset(t for t in row["traits"].split(",") if t)
            messages.append(CorpusMessage(row["file"], data, traits))
    return messages


# ---- what the pipeline tests seed and check -------------------------------------------------
def corpus_seed(count: int | None = None):
    """Corpus messages with flags and distinct INTERNALDATEs in the last two days, in many zones."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    flag_sets = [(), ("\\Seen",), ("\\Flagged", "\\Seen"), ("\\Answered",), ("\\Draft",), ("$Label1", "\\Seen")]
    messages = []
    for index, message in enumerate(corpus()[:count]):
        zone = timezone(timedelta(hours=(index % 25) - 12))
        when = (now - timedelta(minutes=17 * (index + 1))).astimezone(zone)
        messages.append((message.bytes, flag_sets[index % len(flag_sets)], when))
    return messages


def assert_copied_exactly(source, destination, *, kept: Callable[[bytes], bool] = lambda flag: True) -> None:
    """Each source message exactly once: BODY[] bytes, flags and INTERNALDATE (the instant).
    In any UID order: the APPENDs of a batch go out together, and one refused for a moment lands
    after those sent with it (the dates are the source's, and mail clients sort by them).
    `kept`: the flags the destination can store (Outlook.com keeps no keyword but $MDNSent)."""

    def copy(message, flags) -> tuple:
        return message.body, message.internaldate, frozenset(flags)

    wanted = Counter(copy(src, {flag for flag in src.flags if kept(flag)}) for src in source)
    landed = Counter(copy(dst, dst.flags) for dst in destination)
    missing = [src.uid for src in source if (wanted - landed)[copy(src, {f for f in src.flags if kept(f)})]]
    extra = [dst.uid for dst in destination if (landed - wanted)[copy(dst, dst.flags)]]
    assert not missing and not extra, (
        f"source UIDs {missing}: no copy with their bytes, flags and INTERNALDATE; destination UIDs {extra}: "
        "copies of nothing in the source, or extra copies"
    )


def uidnext(server, user, folder) -> int:
    client = connect(server, user)
    try:
        return client.folder_status(folder, [b"UIDNEXT"])[b"UIDNEXT"]
    finally:
        client.logout()
