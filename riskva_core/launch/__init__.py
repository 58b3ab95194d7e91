"""How a training job is started, free of Dagster: each launcher's command line, environment and pod
(commands.py), the local run's process group on cancel (processes.py), and the run identity and
lineage records (resume.py). What speaks the Dagster Pipes protocol lives in riskva_assets: the entry
every rank runs (pipes_rank.py), the Ray Train job (ray_train.py) and the Dagster resources around
them (launch_resources.py); commands.py names those entry modules only as strings in a command line."""
