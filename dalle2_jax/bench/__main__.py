from dalle2_jax.bench import main

if __name__ == "__main__":
    main()
