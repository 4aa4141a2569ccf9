"""Periodic tasks: schedules as events on a compacted topic, fired once per tick by a stage.

``records`` (the events and their fold), ``timing`` (ticks and run ids), ``stage`` (the
stage that fires them) and ``api`` (``app.schedules``); the ``schedules`` command is
:mod:`qtasks_stream.cli.schedules`. See docs/schedules.md.
"""
