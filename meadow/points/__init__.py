"""Contribution points: receipts clients sign for work servers did, each server's hash-chained ledger of them, the
standing that weighs them, and the priority points buy. One idea per module."""
