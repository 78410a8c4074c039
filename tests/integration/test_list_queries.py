"""Lists bounded in SQL, on Postgres and SQLite: keyset pages newest first across ties in created_at, the
metadata filter evaluated by the database, and a page that costs a fixed number of statements and rows
whether the tenant has 30 jobs or 300."""

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from shared.ids import new_id

PAGE = 7


@pytest.fixture
def database(migrated_database) -> str:
    """The API's settings on a migrated database of each kind; returns the dialect's name."""
    return migrated_database


def add_jobs(tenant: str, count: int, first_second: int = 1_700_000_000, metadata=lambda i: None) -> list[str]:
    """`count` jobs, three to a second of created_at (ties the keyset must break by id), inserted out of order."""
    from shared.db import session_scope
    from shared.jobs.models import Job

    ids = []
    with session_scope() as session:
        for i in reversed(range(count)):
            job_id = new_id("ftjob")
            ids.append(job_id)
            created = first_second + i // 3
            session.add(
                Job(
                    id=job_id, tenant=tenant, status="succeeded", model="m", training_file="file-x", seed=1,
                    hyperparameters={}, training_options={}, result_files=[], cancel_requested=False,
                    user_metadata=metadata(i), created_at=created, updated_at=created,
                )
            )  # fmt: skip
    return ids


def newest_first(tenant: str) -> list[str]:
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.jobs.models import Job

    with session_scope() as session:
        rows = session.execute(select(Job.created_at, Job.id).where(Job.tenant == tenant)).all()
    return [job_id for _, job_id in sorted(rows, reverse=True)]


def every_page(list_page, limit: int = PAGE) -> list[str]:
    seen, after = [], None
    while True:
        fetched = list_page(after, limit + 1)
        page = fetched[:limit]
        seen += page
        if len(fetched) <= limit:
            return seen
        after = page[-1]


def service_pages(tenant: str | None, **filters):
    from shared.db import session_scope
    from shared.jobs.service import list_jobs

    def list_page(after, limit):
        with session_scope() as session:
            return [job.id for job in list_jobs(session, tenant, after=after, limit=limit, **filters)]

    return list_page


def test_keyset_pages_are_newest_first_across_ties_and_scoped(database):
    from shared.jobs.errors import JobNotFound

    add_jobs("t", 30)
    others = add_jobs("other", 10)
    assert every_page(service_pages("t")) == newest_first("t")
    assert every_page(service_pages(None)) == newest_first_all()
    with pytest.raises(JobNotFound) as refused:  # another tenant's job is no cursor here
        service_pages("t")(others[0], PAGE)
    assert refused.value.param == "after"


def newest_first_all() -> list[str]:
    return sorted(newest_first("t") + newest_first("other"), key=created_and_id, reverse=True)


def created_and_id(job_id: str):
    from shared.db import session_scope
    from shared.jobs.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.created_at, job.id


TEAMS = ["red", "blue", "green"]


def team_metadata(i: int):
    if i % 5 == 4:
        return None  # jobs created without metadata
    return {"team": TEAMS[i % 3], 'say "hi".x': "yes" if i % 2 else "no"}


def test_metadata_filter_runs_in_the_database_and_pages(database):
    created = add_jobs("t", 40, metadata=team_metadata)
    add_jobs("other", 10, metadata=lambda i: {"team": "red"})
    metadata_of = dict(zip(created, [team_metadata(i) for i in reversed(range(40))], strict=True))
    expected: dict[str, list] = {team: [] for team in TEAMS}
    for job_id in newest_first("t"):
        if metadata_of[job_id]:
            expected[metadata_of[job_id]["team"]].append((job_id, metadata_of[job_id]))
    for team in TEAMS:
        got = every_page(service_pages("t", metadata={"team": team}), limit=3)
        assert got == [job_id for job_id, _ in expected[team]]
    both = every_page(service_pages("t", metadata={"team": "red", 'say "hi".x': "yes"}), limit=3)
    assert both == [job_id for job_id, m in expected["red"] if m['say "hi".x'] == "yes"] and both
    assert every_page(service_pages("t", metadata={"team": "purple"})) == []
    assert every_page(service_pages("t", metadata={"team": "RED"})) == []  # exact, as before


class Counter:
    """Statements sent to the database and Job rows loaded, while active."""

    def __init__(self):
        from shared.db import get_engine
        from shared.jobs.models import Job

        self.statements, self.jobs_loaded = [], 0
        event.listen(get_engine(), "before_cursor_execute", self._statement)
        event.listen(Job, "load", self._loaded)

    def _statement(self, _conn, _cursor, statement, *_):
        self.statements.append(statement)

    def _loaded(self, *_):
        self.jobs_loaded += 1

    def remove(self):
        from shared.db import get_engine
        from shared.jobs.models import Job

        event.remove(get_engine(), "before_cursor_execute", self._statement)
        event.remove(Job, "load", self._loaded)


def page_costs(client: TestClient, job_ids: list[str]) -> list[tuple[int, int]]:
    """(statements, job rows loaded) of a first page, a later page, a filtered page, an event page."""
    requests = [
        "/v1/fine_tuning/jobs?limit=5",
        f"/v1/fine_tuning/jobs?limit=5&after={job_ids[len(job_ids) // 2]}",
        "/v1/fine_tuning/jobs?limit=5&metadata[team]=red",
        "/v1/fine_tuning/jobs?limit=5&status=succeeded",
        f"/v1/fine_tuning/jobs/{job_ids[0]}/events?limit=5",
        f"/v1/fine_tuning/jobs/{job_ids[0]}/checkpoints?limit=5",
    ]
    costs = []
    for path in requests:
        counter = Counter()
        try:
            response = client.get(path)
        finally:
            counter.remove()
        assert response.status_code == 200, response.text
        costs.append((len(counter.statements), counter.jobs_loaded))
    return costs


def test_a_page_costs_the_same_at_30_and_300_jobs(database):
    from shared.auth.service import create_key
    from shared.db import session_scope

    with session_scope() as session:
        secret = create_key(session, "t")[1]
    from api.app import create_app

    client = TestClient(create_app(), headers={"Authorization": f"Bearer {secret}"})
    client.get("/v1/fine_tuning/jobs?limit=1")  # the key is verified (and on Postgres remembered) once
    few = add_jobs("t", 30, metadata=team_metadata)
    at_30 = page_costs(client, newest_first("t"))
    add_jobs("t", 270, first_second=1_600_000_000, metadata=team_metadata)  # older, so page one is unchanged
    at_300 = page_costs(client, newest_first("t"))
    assert at_30 == at_300, (at_30, at_300)
    for statements, jobs_loaded in at_300:
        assert statements <= 4 and jobs_loaded <= 6  # the key, a cursor or the job, the page; limit + 1 rows
    assert few  # the first 30 still exist
    assert client.get("/v1/fine_tuning/jobs?status=failed").json()["data"] == []  # the status filter, in SQL
    assert len(client.get("/v1/fine_tuning/jobs?status=succeeded&limit=7").json()["data"]) == 7
