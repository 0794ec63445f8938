from choline_svc.migrate import run_env

run_env()
