"""The Monitor tab of the /ui page: the server's shift alarm, its label-free estimates over the newest
rows, and, once labels come back, the realized accuracy and coverage: the /monitor document in words.
It refreshes itself every few seconds."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["REFRESH_SECONDS", "monitor_md", "monitor_tab"]

REFRESH_SECONDS = 3.0


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def monitor_md(document: dict | None) -> tuple[str, str, str]:
    """(shift, window, feedback) Markdown of a /monitor document (None: the server keeps no state)."""
    if document is None:
        note = "This server keeps no state (FORDE_MONITOR=0): no shift alarm, no labels."
        return note, "", ""
    shift = document.get("shift")
    if shift is None:
        shift_md = "**No shift alarm**: this model file has no validation reference to compare the traffic with."
    else:
        state = "**ALARM: the inputs have shifted**" if shift["alarm"] else "**No alarm**"
        fired = f", fired at row {shift['fired_at']}" if shift["fired_at"] is not None else ""
        shift_md = (
            f"{state}{fired}.\n\n"
            f"- statistic **{shift['statistic']:.3g}** (threshold {shift['threshold']:.3g}; largest since arming "
            f"{shift['max_statistic']:.3g}) over **{shift['rows']}** rows since the alarm was armed\n"
            f"- the test watches each row's {shift['score'].replace('_', ' ')} against the validation split's: on "
            f"traffic like it, the statistic reaches the threshold with probability at most "
            f"{1 / shift['threshold']:.0%}, ever"
        )
    window = document.get("window") or {}
    sizes = ", ".join(f"{level}: {_number(size, 2)}" for level, size in (window.get("mean_set_size") or {}).items())
    window_md = (
        f"Over the newest **{window.get('rows', 0)}** rows, without labels:\n\n"
        f"- estimated accuracy **{_number(window.get('estimated_accuracy'))}** (mean calibrated confidence: too "
        "high under shift, so read it beside the alarm)\n"
        f"- mean mutual information {_number(window.get('mean_mutual_information'))} nats, abstain rate "
        f"{_number(window.get('abstain_rate'))}\n"
        f"- mean prediction-set size by coverage: {sizes or 'n/a'}"
    )
    feedback = document.get("feedback") or {}
    if not feedback.get("labels"):
        feedback_md = "No labels yet: send the true classes to `POST /feedback` with the answers' ids."
    else:
        rows = [
            f"| {level} | {_number(methods.get('static'))} | {_number(methods.get('adaptive'))} |"
            for level, methods in feedback["coverage"].items()
        ]
        feedback_md = (
            f"**{feedback['labels']}** labels: realized accuracy **{_number(feedback['accuracy'])}**.\n\n"
            "| coverage | static sets | adaptive sets |\n| --- | --- | --- |\n" + "\n".join(rows)
        )
    return shift_md, window_md, feedback_md


def monitor_tab(gr, snapshot: Callable[[], dict | None] | None) -> None:
    """The tab's components, filled from `snapshot()` when the tab opens and every REFRESH_SECONDS."""
    gr.Markdown("### Is the traffic still like the validation data?")
    shift = gr.Markdown("", elem_id="forde-monitor-shift")
    gr.Markdown("### Label-free estimates")
    window = gr.Markdown("", elem_id="forde-monitor-window")
    gr.Markdown("### What the labels say")
    feedback = gr.Markdown("", elem_id="forde-monitor-feedback")
    refresh = gr.Button("Refresh", elem_id="forde-monitor-refresh")

    def fill():
        return monitor_md(None if snapshot is None else snapshot())

    outputs = [shift, window, feedback]
    refresh.click(fill, outputs=outputs, api_visibility="private")
    gr.Timer(REFRESH_SECONDS).tick(fill, outputs=outputs, api_visibility="private")
