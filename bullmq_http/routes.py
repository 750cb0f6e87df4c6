"""The job routes' matcher: werkzeug's URL map, finding a job route by its last segment.

A job route is `/queues/<queue>/jobs/<job_id>/<tail>`, the job id holding slashes as
BullMQ's do; werkzeug would try each route's regular expression in turn.
"""

from __future__ import annotations

from typing import Any

from werkzeug.routing import Map, Rule
from werkzeug.routing.matcher import StateMachineMatcher

from .upstream import use_matcher

# The routes of one job: every route of the reporting and watching products is one of
# these, by its last segment (…/progress, …/logs, …/events, …/watch, …).
JOB_ROUTES = "/queues/<queue>/jobs/<path:job_id>"
JOB_ROUTE = JOB_ROUTES + "/"


class JobRouteMatcher(StateMachineMatcher):
    """Werkzeug's route matcher, with a shortcut for the job routes that end in one fixed
    segment (…/progress, …/logs, …/events, …/watch, …/logs.txt): such a path splits at
    its first slashes and its last one into the rule and its values, where werkzeug
    would try each job route's regular expression in turn, which was a fifth of what a
    job request cost. The shortcut finds exactly the rule and values werkzeug would;
    any path or method it does not know, it hands to werkzeug, redirects and errors
    and all."""

    def __init__(self, merge_slashes: bool) -> None:
        super().__init__(merge_slashes)
        self.by_last_segment: dict[tuple[str, str], Rule] = {}
        self.ambiguous: set[str] = set()  # last segments of longer job routes

    def add(self, rule: Rule) -> None:
        super().add(rule)
        if not rule.rule.startswith(JOB_ROUTE):
            return
        tail = rule.rule.removeprefix(JOB_ROUTE)
        if "/" in tail:
            self.ambiguous.add(tail.rsplit("/", 1)[1])
        elif "<" not in tail and not (rule.defaults or rule.redirect_to or rule.alias):
            for method in rule.methods or ():  # the first rule added wins, as in werkzeug
                self.by_last_segment.setdefault((tail, method), rule)
        for key in [key for key in self.by_last_segment if key[0] in self.ambiguous]:
            del self.by_last_segment[key]

    def match(self, domain: str, path: str, method: str, websocket: bool) -> tuple[Rule, Any]:
        # /queues/<queue>/jobs/<job_id>/<tail>: the queue holds no slash, the job id
        # may; werkzeug's path converter takes neither a leading slash nor a newline.
        if not domain and not websocket and path.startswith("/queues/") and "\n" not in path:
            queue, _, rest = path[8:].partition("/")
            job_id, _, tail = rest[5:].rpartition("/")
            rule = self.by_last_segment.get((tail, method))
            if rule and queue and rest.startswith("jobs/") and job_id[:1] not in ("", "/"):
                return rule, {"queue": queue, "job_id": job_id}
        return super().match(domain, path, method, websocket)


class JobRouteMap(Map):
    """Werkzeug's URL map, matching with JobRouteMatcher."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_matcher(self, JobRouteMatcher(self.merge_slashes))
