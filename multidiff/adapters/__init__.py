"""Modality adapters: raw file <-> raw tensor <-> model tensor. One file per modality."""
