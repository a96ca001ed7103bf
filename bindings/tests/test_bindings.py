"""driftless through its generated Python bindings, loading the real built library.

Run by .ci/run after scripts/bindings; needs the driftless-gateway binary (for its embedded
broker) at DRIFTLESS_GATEWAY_BIN and the generated module on PYTHONPATH.
"""

import os
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from driftless_ffi import (
    ApiError,
    ChangeListener,
    DeleteRule,
    SqlValue,
    SyncConfig,
    SyncDirection,
    SyncStore,
    TrackOptions,
)

SCHEMA = "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, title TEXT, notes TEXT, parts INTEGER NOT NULL DEFAULT 0)"
OPTIONS = TrackOptions(
    direction=SyncDirection.BOTH,
    delete_rule=DeleteRule.DELETE_WINS,
    policies={"notes": "manual", "parts": "counter"},
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


class Recorder(ChangeListener):
    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def on_remote_change(self, table, keys):
        with self.lock:
            self.calls.append((table, keys))

    def keys_for(self, table):
        with self.lock:
            return [k for t, ks in self.calls if t == table for k in ks]


class SyncTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.port = free_port()
        cls.gateway = subprocess.Popen(
            [os.environ["DRIFTLESS_GATEWAY_BIN"], "--db", os.path.join(cls.dir.name, "gw.db"),
             "--embedded-broker", "--listen", "127.0.0.1:%d" % cls.port],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in cls.gateway.stderr:
            if "subscribed to device uplinks" in line:
                break
        threading.Thread(target=lambda: [None for _ in cls.gateway.stderr], daemon=True).start()

    @classmethod
    def tearDownClass(cls):
        cls.gateway.terminate()
        cls.gateway.wait(timeout=10)
        cls.dir.cleanup()

    def store(self, name, tenant):
        s = SyncStore.open(os.path.join(self.dir.name, tenant + "-" + name + ".db"), "")
        s.execute(SCHEMA, [])
        s.track("jobs", OPTIONS)
        return s

    def config(self, tenant, device):
        return SyncConfig(broker_url="mqtt://127.0.0.1:%d" % self.port, tenant=tenant, device_id=device,
                          username=None, password=None)

    def rows(self, store, sql):
        return store.query(sql, []).rows

    def test_a_row_written_on_one_store_arrives_in_the_other_and_the_listener_fires(self):
        a, b = self.store("a", "t1"), self.store("b", "t1")
        heard = Recorder()
        a.start_sync(self.config("t1", "phone-a"), None)
        b.start_sync(self.config("t1", "phone-b"), heard)
        changed = a.execute("INSERT INTO jobs(id, title, parts) VALUES (?, ?, ?)",
                            [SqlValue.TEXT("job-1"), SqlValue.TEXT("replace filter"), SqlValue.INTEGER(3)])
        self.assertEqual(changed, 1)
        wait_for("row on b", lambda: self.rows(b, "SELECT id, title, parts FROM jobs") ==
                 [[SqlValue.TEXT("job-1"), SqlValue.TEXT("replace filter"), SqlValue.INTEGER(3)]])
        wait_for("listener", lambda: heard.keys_for("jobs") == [[SqlValue.TEXT("job-1")]])
        status = a.status()
        self.assertTrue(status.syncing and status.connected)
        wait_for("a acknowledged", lambda: a.status().pending_changes == 0)
        for s in (a, b):
            s.close()

    def test_a_manual_conflict_is_listed_resolved_and_both_stores_converge(self):
        a, b = self.store("a", "t2"), self.store("b", "t2")
        a.start_sync(self.config("t2", "phone-a"), None)
        b.start_sync(self.config("t2", "phone-b"), None)
        a.execute("INSERT INTO jobs(id, notes) VALUES ('job-9', 'start')", [])
        wait_for("row on b", lambda: len(self.rows(b, "SELECT id FROM jobs")) == 1)
        b.stop_sync()
        b.execute("UPDATE jobs SET notes = 'valve seized' WHERE id = 'job-9'", [])
        a.execute("UPDATE jobs SET notes = 'valve ok' WHERE id = 'job-9'", [])
        wait_for("a acknowledged", lambda: a.status().pending_changes == 0)
        b.start_sync(self.config("t2", "phone-b"), None)
        wait_for("conflict on both", lambda: len(a.conflicts()) == 1 and len(b.conflicts()) == 1)
        conflict = a.conflicts()[0]
        self.assertEqual(conflict.table, "jobs")
        self.assertEqual(conflict.key, [SqlValue.TEXT("job-9")])
        self.assertEqual(conflict.column, "notes")
        self.assertTrue(conflict.needs_resolution)
        values = sorted(v.value.value for v in [conflict.shown] + conflict.others)
        self.assertEqual(values, ["valve ok", "valve seized"])
        a.resolve_conflict("jobs", conflict.key, "notes", SqlValue.TEXT("valve freed and tested"))
        notes = "SELECT notes FROM jobs"
        wait_for("resolution everywhere", lambda: self.rows(a, notes) == self.rows(b, notes) ==
                 [[SqlValue.TEXT("valve freed and tested")]])
        wait_for("no conflicts left", lambda: not a.conflicts() and not b.conflicts())
        for s in (a, b):
            s.close()


class ErrorTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.s = SyncStore.open(os.path.join(self.dir.name, "e.db"), "")

    def tearDown(self):
        self.s.close()
        self.dir.cleanup()

    def test_bad_sql_raises_sql_error(self):
        with self.assertRaises(ApiError.Sql) as ctx:
            self.s.execute("SELEC nonsense", [])
        self.assertIn("syntax error", str(ctx.exception))
        with self.assertRaises(ApiError.Sql):
            self.s.query("SELECT * FROM missing_table", [])

    def test_bad_broker_url_raises_invalid_argument(self):
        config = SyncConfig(broker_url="http://example", tenant="t", device_id="d", username=None, password=None)
        with self.assertRaises(ApiError.InvalidArgument) as ctx:
            self.s.start_sync(config, None)
        self.assertIn("broker URL", str(ctx.exception))

    def test_a_table_without_a_usable_key_raises_invalid_argument(self):
        self.s.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER)", [])
        with self.assertRaises(ApiError.InvalidArgument):
            self.s.track("counters", OPTIONS)

    def test_calls_from_many_threads_at_once_are_safe(self):
        self.s.execute(SCHEMA, [])
        self.s.track("jobs", OPTIONS)
        errors = []

        def worker(n):
            try:
                for i in range(50):
                    self.s.execute("INSERT INTO jobs(id, parts) VALUES (?, ?)",
                                   [SqlValue.TEXT("w%d-%d" % (n, i)), SqlValue.INTEGER(i)])
                    self.s.query("SELECT count(*) FROM jobs", [])
                    self.s.status()
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(self.s.query("SELECT count(*), sum(parts) FROM jobs", []).rows,
                         [[SqlValue.INTEGER(200), SqlValue.INTEGER(4 * sum(range(50)))]])
        self.assertEqual(self.s.status().pending_changes, 200)

    def test_a_closed_store_raises_closed(self):
        self.s.close()
        with self.assertRaises(ApiError.Closed):
            self.s.query("SELECT 1", [])
        with self.assertRaises(ApiError.Closed):
            self.s.status()


if __name__ == "__main__":
    unittest.main()
