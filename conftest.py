"""Fixtures shared by the test files: token files, the scripted driver server, the plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import driver_plugin as dp
from harness.loopback import SA_TOKEN, TOKEN, FakeDriver, Plugin


@pytest.fixture
def driver() -> Iterator[FakeDriver]:
    fake = FakeDriver()
    yield fake
    fake.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN)  # Argo writes no newline
    return path


@pytest.fixture
def sa_token_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text(SA_TOKEN + "\n")
    return path


@pytest.fixture
def start(
    driver: FakeDriver, token_file: Path, sa_token_file: Path
) -> Iterator[Callable[..., Plugin]]:
    plugins: list[Plugin] = []

    def start(**overrides: Any) -> Plugin:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "upstream": driver.url,
            "token_file": str(token_file),
            "sa_token_file": str(sa_token_file),
            "reply_deadline": 5.0,
        }
        values.update(overrides)
        plugin = Plugin(dp.Settings(**values))
        plugins.append(plugin)
        return plugin

    yield start
    for plugin in plugins:
        plugin.stop()
