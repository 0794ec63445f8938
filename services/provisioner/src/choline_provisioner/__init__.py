"""choline provisioner service:

Rents, health-checks and tears down boxes through providers; owns runs, attempts, boxes, schedules."""
