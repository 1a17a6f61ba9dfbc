"""The import file host refuses odd query values with a 400/403, never a 500 (issue 16 #13).

Before: a non-ASCII ``sig`` made ``hmac.compare_digest`` raise (500), and ``expires`` was read with
``int()``, which also takes " 123 ", "+123", "1_796..." and non-ASCII digits.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from sinks.filehost import SignedFileHost, sign, verify, well_formed

KEY = b"k" * 32
PATH = "/imports/abc.csv"
FAR = 4_000_000_000  # an expiry in 2096


def test_only_ascii_digits_and_64_hex_characters_are_read() -> None:
    sig = sign(KEY, PATH, FAR)
    assert verify(KEY, PATH, str(FAR), sig, now=0)
    assert verify(KEY, PATH, str(FAR), sig.upper(), now=0)  # hex is hex, whatever its case
    for expires in (f" {FAR} ", f"+{FAR}", f"{FAR:_}", "".join(chr(0x0660 + int(c)) for c in str(FAR)),
                    f"{FAR}\n", "", "1" * 13, "-1"):
        assert not well_formed(expires, sig), expires
        assert not verify(KEY, PATH, expires, sig, now=0), expires
    for bad_sig in ("é" * 64, sig[:-1], sig + "0", f" {sig}", sig[:-1] + "g", sig[:-1] + "\u0660", ""):
        assert not well_formed(str(FAR), bad_sig), bad_sig
        assert not verify(KEY, PATH, str(FAR), bad_sig, now=0), bad_sig


@given(st.text(), st.text(), st.text())
def test_verify_never_raises_and_accepts_nothing_it_did_not_sign(path: str, expires: str, sig: str) -> None:
    assert verify(KEY, path, expires, sig, now=0) is (
        well_formed(expires, sig) and sig.lower() == sign(KEY, path, int(expires)))


def _serve(host: SignedFileHost, url: str) -> int:
    """Status of the host's handler for one URL, in-process (no socket)."""
    name = URL(url).path.rsplit("/", 1)[-1]
    request = make_mocked_request("GET", url, match_info={"name": name})
    return asyncio.run(host._serve(request)).status


@given(st.text(), st.text(), st.text(min_size=1).filter(lambda s: "/" not in s))
def test_no_query_value_gives_a_500(expires: str, sig: str, name: str) -> None:
    host = SignedFileHost(secret=KEY)
    host.files["abc.csv"] = (b"id\n", time.time() + 60)
    url = str(URL.build(path=f"/imports/{name}", query={"expires": expires, "sig": sig}))
    status = _serve(host, url)
    assert status in (400, 403), (url, status)
    assert status == 400 or well_formed(expires, sig)  # 403 only for a well-formed but wrong signature


async def test_the_server_answers_400_or_403_to_odd_bytes_and_200_to_its_own_url() -> None:
    host = SignedFileHost(secret=KEY, ttl_seconds=60)
    try:
        _, url = await host.publish(b"id\n")
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}{parts.path}"
        expires = str(int(time.time()) + 60)
        good_sig = sign(KEY, parts.path, int(expires))
        odd = {
            f"?expires={expires}&sig=%C3%A9%C3%A9": 400,  # non-ASCII sig: was a 500
            f"?expires={expires}&sig={'é' * 64}": 400,
            f"?expires={expires}&sig=%FF%FE": 400,  # not even UTF-8
            f"?expires=%20{expires}%20&sig={good_sig}": 400,
            f"?expires=%2B{expires}&sig={good_sig}": 400,
            f"?expires={'%D9%A1' * 10}&sig={good_sig}": 400,  # Arabic-Indic digits
            f"?expires={expires[:2]}_{expires[2:]}&sig={good_sig}": 400,
            f"?expires={expires}": 400,
            "": 400,
            f"?expires={expires}&sig={'0' * 64}": 403,
            f"?expires={int(expires) + 1}&sig={good_sig}": 403,
        }
        async with aiohttp.ClientSession() as session:
            for query, expected in odd.items():
                async with session.get(URL(base + query, encoded=True)) as resp:
                    assert resp.status == expected, (query, resp.status, await resp.text())
            async with session.get(URL(f"{parts.scheme}://{parts.netloc}/imports/%FF.csv?expires={expires}"
                                       f"&sig={good_sig}", encoded=True)) as resp:
                assert resp.status == 403
            async with session.get(URL(base + f"?expires={expires}&sig={good_sig.upper()}", encoded=True)) as resp:
                assert resp.status == 200 and await resp.read() == b"id\n"
            async with session.get(URL(url, encoded=True)) as resp:
                assert resp.status == 200
    finally:
        await host.close()
