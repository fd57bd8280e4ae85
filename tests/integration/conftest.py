"""Fixtures for the tpmail integration tests (real Dovecot + tpmaild).

Environment:
  TPMAIL_BUILD_DIR   meson build dir with supervisor/tpmaild, proxy/tpmail-pop3,
                     supervisor/tpmailctl (default: <repo>/build)
"""

import os
import signal
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))

from dovecot import Dovecot  # noqa: E402
import tpmail_harness as th  # noqa: E402
from tpmail_harness import (USERS, STANDARD_SERVICES, standard_crs,  # noqa: E402
                            standard_destinations, standard_mailboxes)

_ACTIVE = th.ACTIVE


# --------------------------------------------------------------------------
# Dovecot

@pytest.fixture(scope="session")
def dovecot():
    # Dovecot(workdir=None): a fresh dir under the system temp dir, because
    # the (non-root) mail user must be able to traverse to the maildirs,
    # which pytest's 0700 basetemp does not allow.
    dc = Dovecot(users=USERS)
    yield dc
    dc.close()


@pytest.fixture(autouse=True)
def _dovecot_log_mark(request):
    """Remember where Dovecot's log was when the test began (for failure
    reports and log assertions)."""
    if "dovecot" in request.fixturenames:
        dc = request.getfixturevalue("dovecot")
        try:
            request.node._dovecot_log_offset = os.path.getsize(dc.log_path)
        except OSError:
            request.node._dovecot_log_offset = 0
    yield


@pytest.fixture
def mailboxes(dovecot):
    """Seed every user's maildir with the standard messages; returns them."""
    if not dovecot.running:
        dovecot.start()
    boxes = standard_mailboxes()
    for user, msgs in boxes.items():
        dovecot.seed(user, msgs)
    return boxes


def dovecot_log_since(dc, offset):
    with open(dc.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.fixture
def dovecot_log(dovecot, request):
    """Callable: Dovecot log text written since the test began."""
    def get():
        return dovecot_log_since(dovecot, getattr(request.node, "_dovecot_log_offset", 0))
    return get


# --------------------------------------------------------------------------
# destinations / CRs

# --------------------------------------------------------------------------
# tpmaild

@pytest.fixture(scope="session")
def bins():
    try:
        return th.binaries()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def tpmaild_factory(bins, dovecot, tmp_path):
    """make(crs=None, destinations=None, args=(), expect=...) -> Tpmaild.

    Defaults: the standard CRs and destinations; waits until ``expect``
    services are running.  Teardown: SIGTERM, exit 0, no proxy left."""
    started = []

    def make(crs=None, destinations=None, args=(), expect=None, name=None):
        wd = tmp_path / (name or "tpmaild%d" % len(started))
        wd.mkdir(parents=True)
        if crs is None:
            crs = standard_crs()
            if expect is None:
                expect = STANDARD_SERVICES
        if destinations is None:
            destinations = standard_destinations(dovecot)
        if expect is None:
            expect = []
        t = th.start_tpmaild(bins, wd, crs, destinations, args, expect)
        started.append(t)
        return t

    yield make
    errors = th.teardown_all(started)
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture(scope="module")
def standard_tpmaild(bins, dovecot, tmp_path_factory):
    """One tpmaild with the standard CRs for a whole module (read-only
    tests: mailboxes are re-seeded per test by ``mailboxes``)."""
    wd = tmp_path_factory.mktemp("tpmaild-std")
    t = th.start_tpmaild(bins, wd, standard_crs(), standard_destinations(dovecot), ["--idle-timeout", "60"],
               STANDARD_SERVICES)
    yield t
    try:
        th.teardown_tpmaild(t)
    except AssertionError as e:
        pytest.fail("%s\n--- tpmaild log tail ---\n%s" % (e, t.log_text()[-6000:]), pytrace=False)


# --------------------------------------------------------------------------
# failure reports: attach tpmaild and Dovecot logs

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    for i, t in enumerate(list(_ACTIVE)):
        text = t.log_text()
        rep.sections.append(("tpmaild[%d] log (%s)" % (i, t.log_path), text[-12000:]))
        if t.last_status is not None:
            rep.sections.append(("tpmaild[%d] last status" % i, repr(t.last_status)[:4000]))
    dc = item.funcargs.get("dovecot") if hasattr(item, "funcargs") else None
    if dc is not None:
        try:
            text = dovecot_log_since(dc, getattr(item, "_dovecot_log_offset", 0))
            rep.sections.append(("dovecot log (this test)", text[-8000:]))
        except OSError:
            pass
