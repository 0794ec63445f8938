from choline_svc.service import main

from .main import MonitorService

main(MonitorService)
