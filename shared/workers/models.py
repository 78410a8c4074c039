from sqlalchemy import JSON, BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class WorkerHeartbeat(Base):
    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[int] = mapped_column(BigInteger)
    last_heartbeat: Mapped[int] = mapped_column(BigInteger)
    current_jobs: Mapped[list] = mapped_column(JSON, default=list)
    info: Mapped[dict] = mapped_column(JSON, default=dict)


class DeviceUsage(Base):
    """Which job held which device of which worker, and when (milliseconds): the record that shows devices are
    never over-committed, and the base for utilisation figures."""

    __tablename__ = "device_usage"
    __table_args__ = (Index("ix_device_usage_worker_device", "worker", "device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    worker: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(32))  # "gpu:0", "cpu:1"
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at_ms: Mapped[int] = mapped_column(BigInteger)
    ended_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
