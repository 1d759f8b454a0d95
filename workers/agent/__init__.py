"""Agents: the pure decision logic of a call (see ``piopiy_voice.workers.agent.base``)."""

from .base import Agent, Tick, load_agent_class

__all__ = ["Agent", "Tick", "load_agent_class"]
