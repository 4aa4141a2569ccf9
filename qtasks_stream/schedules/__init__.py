"""Periodic tasks: schedules as events on a compacted topic, fired once per tick by a stage.

``records`` (the events and their fold), ``timing`` (ticks and run ids), ``stage`` (the
stage that fires them), ``api`` (``app.schedules``) and ``cli``. See docs/schedules.md.
"""
