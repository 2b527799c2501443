"""Rollouts: the episodes a PPO iteration learns from (``episodes``)."""
