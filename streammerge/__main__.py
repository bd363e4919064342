from streammerge.front.cli import run

run()
