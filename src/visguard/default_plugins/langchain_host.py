"""Registers the ``langchain`` host (:class:`visguard.integrations.langchain.host.LangChainHost`)."""

from __future__ import annotations

from visguard.hookspecs import hookimpl
from visguard.integrations.langchain.host import LangChainHost


@hookimpl
def register_hosts(register):
    register("langchain", LangChainHost)
