from choline_svc.service import main

from .main import ApiService

main(ApiService)
