"""How a failed token-endpoint call is read: a timeout, an untrusted certificate, or neither,
whatever requests, urllib3 and google-auth wrapped it in."""

from __future__ import annotations

import ssl

import google.auth.exceptions
import requests
import urllib3.exceptions

from shared.tokens.sources import timed_out, untrusted_certificate


def wrapped(inner: BaseException) -> BaseException:
    """As google-auth raises it: a TransportError from requests' error, from urllib3's."""
    try:
        try:
            raise requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(None, "/token", inner))
        except requests.exceptions.SSLError as exc:
            raise google.auth.exceptions.TransportError(exc) from exc
    except google.auth.exceptions.TransportError as outer:
        return outer


def test_an_untrusted_certificate_is_found_inside_the_wrappers():
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "unable to get local issuer certificate"
    error = wrapped(urllib3.exceptions.SSLError(refused))
    assert untrusted_certificate(error) == "unable to get local issuer certificate"
    assert not timed_out(error)


def test_a_reason_that_is_text_is_read_past_not_called():
    """urllib3 gives some errors a string as their `reason`: reading it as an exception raised
    AttributeError ('str' object has no attribute '__cause__'), which drain reported as the
    scan's failure instead of what went wrong."""
    error = wrapped(urllib3.exceptions.ProtocolError("Connection aborted.", "remote end closed"))
    error.reason = "a text, not an exception"
    assert untrusted_certificate(error) is None
    assert not timed_out(error)
    assert timed_out(wrapped(urllib3.exceptions.ReadTimeoutError(None, "/token", "read timed out")))
