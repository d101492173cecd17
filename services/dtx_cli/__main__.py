from dtx_cli.main import app

app()
