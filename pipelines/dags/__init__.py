"""Example Airflow DAGs (they import Airflow, not this project)."""
