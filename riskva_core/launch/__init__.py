"""How a training job is started, free of Dagster: each launcher's command line, environment and pod
(commands.py), the entry every rank runs (rank.py), the Ray Train job (ray_train.py), the local run's
process group on cancel (processes.py), and the run identity and lineage records (resume.py).
riskva_assets/launch_resources.py is the Dagster glue around it."""
