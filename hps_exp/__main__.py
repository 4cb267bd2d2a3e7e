from hps_exp.app import main

# vLLM starts its engine in spawned processes that re-import __main__: only the launching process runs the app.
if __name__ == "__main__":
    main()
