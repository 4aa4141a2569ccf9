"""Operator tools on a deployment's log: a task's history as of any time (:mod:`.audit`),
rebuilding a view from the log and comparing it with the live one (:mod:`.replay`), choosing
tasks to submit again (:mod:`.rerun`), view snapshots (:mod:`.snapshot`) and the dead-letter
queue (:mod:`.dlq`). The app's client, the console and the CLI call them; they work on the
log, the views and the serde, and import none of their callers."""
