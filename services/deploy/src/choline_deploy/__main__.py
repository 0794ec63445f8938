from choline_svc.service import main

from .main import DeployService

main(DeployService)
