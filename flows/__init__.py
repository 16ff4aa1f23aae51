"""Prefect orchestration of the dvc.yaml DAG."""
