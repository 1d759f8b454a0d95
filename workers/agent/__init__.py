"""Agents: the pure decision logic of a call (see ``piopiy_voice.workers.agent.base``)."""

from .base import Agent, Cancel, Tick, Work, load_agent_class

__all__ = ["Agent", "Cancel", "Tick", "Work", "load_agent_class"]
